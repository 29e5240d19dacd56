"""One chat round from request to stored reply.

`ChatService.open` does everything up to the upstream's first token (claim the round in order,
wait for earlier rounds of the task, read the history, call the upstream), so any failure there
still becomes a proper HTTP error. The reply is then streamed (`sse_events`) or collected
(`complete`); either way the round is stored exactly once, by `LiveRound.close`, with the text the
client actually received (and the tool calls the round made on the way).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, AsyncGenerator, Awaitable, Callable, Mapping

import anyio
from langchain_core.messages import BaseMessage
from sqlalchemy.exc import SQLAlchemyError
from sse_starlette import ServerSentEvent

from core.db import Database
from core.errors import ApiError, bad_request
from core.logs import request_id
from core.metrics import LLM_ADDED, LLM_FALLBACKS, LLM_FIRST_TOKEN, LLM_ROUNDS, LLM_UPSTREAM_ERRORS
from core.settings import Settings
from llm_proxy import store
from llm_proxy.context import (
    SYSTEM_ROLES,
    Msg,
    StoredRound,
    Turn,
    finished_tool_exchanges,
    replayed_reply,
    split_turn,
    unanswered_calls,
)
from llm_proxy.agents import Agent, Agents
from llm_proxy.disconnect import runs_to_the_end
from llm_proxy.history_cache import HistoryCache
from llm_proxy.fast_reply import FastLine, FastStart, fast_start
from llm_proxy.live_round import LiveRound, Started, UpstreamCall, abandon_started, elapsed_ms
from llm_proxy.models import ID_MAX_CHARS, NO_APP
from llm_proxy.profiles import PromptContext
from llm_proxy.protocol import ChatCompletionRequest, ChunkWriter, completion_body, error_event
from llm_proxy.recovery import Lease, PendingRound
from llm_proxy.round_context import ContextSources, RoundInputs
from llm_proxy.store import Claim, Failure, HistoryCopy, RequestIdReused, RoundTiming, TaskInfo, TaskOwnedElsewhere
from llm_proxy.upstream import Delta

log = logging.getLogger("trtc.llm")

_POLL_S = 0.02
# Failures before the first token after which a profile's next upstream is tried.
_FALL_BACK_ON = frozenset(
    {"upstream_unreachable", "upstream_timeout", "upstream_failed", "upstream_rate_limited", "upstream_invalid",
     "first_token_timeout"}
)
# What a write fails with when the database is down or the connection is gone.
_DATABASE_DOWN = (SQLAlchemyError, OSError)


def task_info(headers: Mapping[str, str]) -> TaskInfo | None:
    """The TRTC headers of a request, or None for a stateless request (no `X-Task-Id`). Each is
    at most `ID_MAX_CHARS` long (400 otherwise), so every database stores what every other does."""
    task_id = headers.get("x-task-id")
    if not task_id:
        return None
    info = TaskInfo(
        task_id=task_id,
        request_id=request_id(headers),
        # An empty header is no value (the task's owner check treats both alike).
        sdk_app_id=headers.get("x-sdk-app-id") or None,
        user_id=headers.get("x-user-id") or None,
        room_id=headers.get("x-room-id") or None,
        room_id_type=headers.get("x-room-id-type") or None,
    )
    if info.sdk_app_id == NO_APP:
        raise bad_request(
            f"Header X-Sdk-App-Id {NO_APP!r} is reserved: it is how the admin API names the requests sent without "
            "the header. Send the TRTC SdkAppId, or no header.",
            "reserved_app_id",
        )
    values = (info.task_id, info.request_id, info.sdk_app_id, info.user_id, info.room_id, info.room_id_type)
    for header, value in zip(_ID_HEADERS, values):
        if value is not None and len(value) > ID_MAX_CHARS:
            raise bad_request(
                f"Header {header} is {len(value)} characters long; this server takes at most {ID_MAX_CHARS}.",
                "header_too_long",
            )
    return info


_ID_HEADERS = ("X-Task-Id", "X-Request-Id", "X-Sdk-App-Id", "X-User-Id", "X-Room-Id", "X-Room-Id-Type")


@dataclass(frozen=True)
class Replay:
    """A retried round that already completed: its stored reply, sent again."""

    completion_id: str
    model: str
    text: str
    usage: dict[str, int] | None
    include_usage: bool
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    @property
    def finish_reason(self) -> str:
        return "tool_calls" if self.tool_calls else "stop"


class ChatService:
    def __init__(self, settings: Settings, db: Database, agents: Agents, lease: Lease) -> None:
        self.settings = settings
        self.db = db
        self.lease = lease
        # Replaced whole on SIGHUP; a round keeps the agent it started with.
        self.agents = agents
        self.history = HistoryCache(settings.history_cache_tasks, settings.history_max_rounds)
        # Rounds of this process still streaming; a later round of the same task awaits these
        # instead of polling the database.
        self._running: dict[str, asyncio.Event] = {}
        # Tasks with a claim under way in this process, and how many.
        self._claiming: Counter[str] = Counter()
        lease.works_on = self._works_on
        # What to do when a stored round was awaited by callbacks (`Round.held`): the app wires
        # in the callback service's `apply_held`.
        self.on_held: Callable[[str], Awaitable[None]] | None = None
        # What a round's context is made of besides its turn: the app wires memory and knowledge in.
        self.context = ContextSources(settings)

    async def open(self, request: ChatCompletionRequest, task: TaskInfo | None, key: str | None = None) -> LiveRound | Replay:
        """`key`: the bearer key, which (with the request's `model`) selects the profile."""
        started = time.perf_counter()
        agent = self.agents.select(key, request.model)
        model = agent.model(request.model)
        if not model:
            raise bad_request("`model` is required (or set UPSTREAM_MODEL on the server).", "model_required")
        calls = self._upstream_calls(request, model, agent)
        call = calls[0]
        prompt_context = PromptContext(
            task_id=task.task_id if task else None,
            user_id=task.user_id if task else None,
            room_id=task.room_id if task else None,
            sdk_app_id=task.sdk_app_id if task else None,
            meta=request.body_fields,
        )
        if task is None:
            messages = [m.to_dict() for m in request.messages]
            head = [m for m in messages if m["role"] not in SYSTEM_ROLES]
            fast = fast_start(agent, call.model, head, request.stream)
            inputs = RoundInputs(agent, [m for m in messages if m["role"] in SYSTEM_ROLES], head, prompt_context,
                                 model=call.model, fast_reply=fast is not None)
            context = await self.context.build(inputs)
            return await self._start(None, head, context.messages(inputs), calls, started, context.knowledge, fast)

        turn = split_turn(request.messages)
        claim = await self._claim(replace(task, profile=agent.name, welcome=agent.profile.welcome_message), turn, call)
        if claim.replay is not None:
            LLM_ROUNDS.labels("replayed").inc()
            return _replay(claim, claim.replay, call)
        try:
            answered = _answered_before(claim, turn)
            if answered is not None:
                await self.release(claim)
                LLM_ROUNDS.labels("replayed").inc()
                return _replay(claim, answered, call)
            head = _head(claim, turn)
            fast = fast_start(agent, call.model, head, request.stream)
            inputs = RoundInputs(agent, turn.system, head, prompt_context, await self._history(claim), claim, call.model,
                                 fast_reply=fast is not None)
            context = await self.context.build(inputs)
            return await self._start(claim, head, context.messages(inputs), calls, started, context.knowledge, fast)
        except asyncio.CancelledError:
            await self._abandon(claim, turn, call, started)
            raise
        except BaseException as exc:
            await self.release(claim, failure(exc, task.request_id))
            LLM_ROUNDS.labels("failed").inc()
            raise

    def _upstream_calls(self, request: ChatCompletionRequest, model: str, agent: Agent) -> list[UpstreamCall]:
        """The round's call to the profile's upstream, then to each of its fallbacks."""
        client_tools = request.tools or []
        client_names = frozenset(tool.get("function", {}).get("name", "") for tool in client_tools)
        server_tools = [t for t in agent.tools.schemas() if t["function"]["name"] not in client_names]
        passthrough, extra, as_sent = request.passthrough(), request.extra_fields(), request.extra_fields_as_sent()
        call = UpstreamCall(
            model=model,
            params=agent.params(agent.upstream_config, passthrough, as_sent),
            extra_fields=extra or None,
            include_usage=request.include_usage or not request.stream,
            tools=[*server_tools, *client_tools] or None,
            registry=agent.tools,
            upstream=agent.upstream,
            client_tools=client_names,
            profile=agent.name,
            upstream_label=agent.upstream_config.label,
            strip_reasoning=agent.profile.output.strip_reasoning,
            first_token_timeout_s=agent.profile.first_token_timeout_s,
            speakable=agent.profile.output.speakable,
        )
        fallbacks = [
            replace(
                call,
                model=config.model or request.model or model,
                params=agent.params(config, passthrough, as_sent),
                upstream=client,
                upstream_label=config.label,
            )
            for config, client in agent.fallbacks
        ]
        return [call, *fallbacks]

    async def _start(
        self,
        claim: Claim | None,
        head: list[Msg],
        context: list[BaseMessage],
        calls: list[UpstreamCall],
        started: float,
        knowledge: list[dict[str, Any]] | None = None,
        fast: FastStart | None = None,
    ) -> LiveRound:
        """The round, once its upstream gave its first token (`_first`), or once a fast reply's
        line is to be spoken before it (`fast_reply`): then the upstream's first token is still
        awaited, by the round as it streams. The small model is called when the main one is."""
        LLM_ADDED.observe(time.perf_counter() - started)
        line: str | None = None
        pending: asyncio.Task[Started] | None = None
        if fast is None:
            call, stream, first = await _first(calls, context)
        else:
            main = asyncio.create_task(_first(calls, context))
            fast_line = FastLine(*fast)
            try:
                line = await fast_line.race(main, started)
            except BaseException:
                fast_line.cancel()
                await abandon_started(main)
                raise
            if line is None:
                call, stream, first = await main
            else:
                pending = main
        LLM_FIRST_TOKEN.observe(time.perf_counter() - started)
        return LiveRound(
            self,
            claim=claim,
            head=head,
            context=context,
            call=calls[0] if pending is not None else call,
            stream=None if pending is not None else stream,
            first=None if pending is not None else first,
            started=started,
            completion_id="chatcmpl-" + (claim.round_id if claim else uuid.uuid4().hex),
            max_tool_steps=self.settings.tool_max_steps,
            knowledge=knowledge,
            prelude=line,
            pending=pending,
        )

    async def _claim(self, task: TaskInfo, turn: Turn, call: UpstreamCall) -> Claim:
        claim = await self._claim_once(task, turn, call, take_over_pending=False)
        if claim.in_flight:
            # A retry while the first attempt still runs (it usually is being cancelled, as the
            # orchestrator gave up on it): wait for it, then replay or redo its round.
            await self._wait_for([claim.round_id])
            claim = await self._claim_once(task, turn, call, take_over_pending=True)
        return claim

    async def _claim_once(self, task: TaskInfo, turn: Turn, call: UpstreamCall, *, take_over_pending: bool) -> Claim:
        """One claim, counted in `_claiming` until its round is in `_running`: a pending round of
        this process that is in neither (nor waiting for a delayed write) is an orphan."""
        self._claiming[task.task_id] += 1
        try:
            claim = await self._claim_in_db(task, turn, call, take_over_pending=take_over_pending)
            if claim.is_new_work:
                self._running[claim.round_id] = asyncio.Event()
            return claim
        finally:
            self._claiming[task.task_id] -= 1
            if not self._claiming[task.task_id]:
                del self._claiming[task.task_id]

    def _works_on(self, pending: PendingRound) -> bool:
        return pending.id in self._running or pending.task_id in self._claiming

    async def _claim_in_db(self, task: TaskInfo, turn: Turn, call: UpstreamCall, *, take_over_pending: bool) -> Claim:
        try:
            return await self._claim_or_refuse(task, turn, call, take_over_pending=take_over_pending)
        except TaskOwnedElsewhere:
            raise ApiError(
                409,
                f"Task {task.task_id!r} belongs to another agent profile or X-Sdk-App-Id; a task id is one "
                "conversation of one tenant. Nothing was stored.",
                "invalid_request_error",
                "task_owned_elsewhere",
            ) from None
        except RequestIdReused:
            raise ApiError(
                409,
                f"X-Request-Id {task.request_id!r} already answered other words in this task; a retry must send the "
                "same messages, a new turn needs a new request id. Nothing was stored.",
                "invalid_request_error",
                "request_id_reused",
            ) from None

    async def _claim_or_refuse(self, task: TaskInfo, turn: Turn, call: UpstreamCall, *, take_over_pending: bool) -> Claim:
        max_rounds = self.settings.history_max_rounds
        known = self.history.known(task.task_id)
        owner = self.lease.id
        head = [] if turn.continues else turn.new
        claim = None
        if self.db.dialect == "postgresql" and not turn.continues and not take_over_pending and not store.may_repeat(head):
            # A new round in one statement; for a retry nothing is claimed, and `claim_round` does
            # it (and a turn that may repeat earlier ones, which it reads first).
            job = self.db.run_autocommit(
                store.claim_new_round, task, max_rounds=max_rounds, owner=owner, head=head, known=known
            )
            claim = await self._settled(job, turn, call)
        if claim is None:
            job = self.db.run(
                store.claim_round,
                task,
                max_rounds=max_rounds,
                owner=owner,
                head=head,
                known=known,
                take_over_pending=take_over_pending,
                continue_round=turn.continues,
            )
            claim = await self._settled(job, turn, call)
        if claim is None:
            raise bad_request(
                "These tool results answer no open tool call: the task's last round did not end in calls of your tools.",
                "no_open_tool_calls",
            )
        return claim

    async def _settled(self, job: asyncio.Future[Claim | None], turn: Turn, call: UpstreamCall) -> Claim | None:
        """The claim runs to its end even if the client leaves meanwhile; a round it took is then
        stored as abandoned rather than left pending, which would stall the task's next round."""
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            claim = await job
            if claim is not None and claim.is_new_work:
                await self._abandon(claim, turn, call)
            raise

    async def _history(self, claim: Claim) -> list[StoredRound]:
        """The finished rounds before the claimed one, newest first: read with the claim, or
        this process's current copy, or (after waiting for earlier rounds) read again."""
        copy = HistoryCopy(claim.version, claim.seq - 1, claim.edits)
        if claim.history is not None:
            if claim.reopened_status is None:
                self.history.put(claim.task_id, copy, claim.history)
            return claim.history
        if claim.newer is not None:
            extended = self.history.extend(claim.task_id, claim.newer_after, claim.newer, copy)
            if extended is not None:
                return extended
        elif claim.reopened_status is None and not claim.pending_before:
            cached = self.history.get(claim.task_id, claim.version, claim.seq)
            if cached is not None:
                return cached
        await self._wait_for(claim.pending_before)
        return await self.db.run(
            store.load_history, claim.task_id, claim.seq, max_rounds=self.settings.history_max_rounds
        )

    @runs_to_the_end
    async def store(
        self,
        claim: Claim,
        messages: list[Msg],
        *,
        interrupted: bool,
        finish_reason: str | None,
        usage: dict[str, int] | None,
        call: UpstreamCall,
        timing: RoundTiming,
    ) -> None:
        """Store a claimed round with its messages, and let rounds waiting for it go on; to the
        end, even if the client leaves meanwhile (`runs_to_the_end`). If the database cannot be
        reached, the write is retried in the background (`Lease.retry_later`): the client has its
        answer either way."""
        # A new round's finish is one statement on PostgreSQL (see `finish_round`).
        run = self.db.run if claim.reopened_status is not None else self.db.run_autocommit

        def finish() -> asyncio.Future[store.Finished | None]:
            return run(
                store.finish_round,
                claim,
                messages,
                interrupted=interrupted,
                model=call.model,
                finish_reason=finish_reason,
                usage=usage,
                profile=call.profile,
                upstream=call.upstream_label,
                timing=timing,
                extra_fields=call.extra_fields,
            )

        try:
            try:
                finished = await finish()
            except _DATABASE_DOWN as exc:
                log.error("could not store round %s (%s); retrying in the background", claim.round_id, exc)
                self.history.drop(claim.task_id)
                self.lease.retry_later(claim.round_id, finish)
                return
            if finished is None:
                log.warning("round %s is no longer pending (another process settled it when this one's lease ran out, "
                            "or its task was deleted); its reply is not stored", claim.round_id)
                self.history.drop(claim.task_id)
            elif claim.reopened_status is not None:
                self.history.drop(claim.task_id)
            else:
                self.history.advance(claim.task_id, finished.version, finished.stored)
            if finished is not None and finished.held and self.on_held is not None:
                # Before the next round of the task may read it: a 905 that came while this
                # round streamed cuts it now.
                await self.on_held(claim.task_id)
        finally:
            self.round_done(claim.round_id)

    async def _abandon(self, claim: Claim, turn: Turn, call: UpstreamCall, started: float | None = None) -> None:
        """The client left before the first token: keep what the user said, reply empty."""
        try:
            head = _head(claim, turn)
        except ApiError:
            head = claim.stored or turn.new
        with anyio.CancelScope(shield=True):
            await self.store(
                claim,
                [*head, {"role": "assistant", "content": ""}],
                interrupted=True,
                finish_reason=None,
                usage=None,
                call=call,
                timing=RoundTiming(total_ms=None if started is None else elapsed_ms(started)),
            )
            LLM_ROUNDS.labels("interrupted").inc()

    async def _wait_for(self, round_ids: list[str]) -> None:
        """Wait until the given rounds are stored, at most `ROUND_WAIT_TIMEOUT_S` in all. A round
        whose process is gone is settled on the spot instead (`recovery`)."""
        deadline = time.monotonic() + self.settings.round_wait_timeout_s
        remote = []
        for round_id in round_ids:
            event = self._running.get(round_id)
            if event is None:
                remote.append(round_id)
                continue
            try:
                await asyncio.wait_for(event.wait(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                break
        while remote and time.monotonic() < deadline:
            # Rounds running in another worker or replica (or left by a dead one): the database
            # is the only signal.
            remote, _settled = await self.lease.settle_dead(remote)
            if remote:
                await asyncio.sleep(_POLL_S)
        if time.monotonic() >= deadline:
            log.warning("earlier rounds still pending after %.1fs; going on without them",
                        self.settings.round_wait_timeout_s, extra={"rounds": round_ids})

    def round_done(self, round_id: str) -> None:
        event = self._running.pop(round_id, None)
        if event is not None:
            event.set()

    @runs_to_the_end
    async def release(self, claim: Claim, failure: Failure | None = None) -> None:
        try:
            await self.db.run(store.release_round, claim, failure)
        except _DATABASE_DOWN as exc:
            log.error("could not release round %s (%s); retrying in the background", claim.round_id, exc)
            self.lease.retry_later(claim.round_id, lambda: self.db.run(store.release_round, claim, failure))
        finally:
            self.round_done(claim.round_id)

    async def complete(self, request: ChatCompletionRequest, task: TaskInfo | None, key: str | None = None) -> dict[str, Any]:
        """A non-streaming answer, built from the upstream's stream."""
        reply = await self.open(request, task, key)
        if isinstance(reply, Replay):
            return completion_body(
                reply.completion_id, reply.model, reply.text, reply.finish_reason, reply.usage, reply.tool_calls
            )
        parts: list[str] = []
        stored = False
        try:
            async for delta in reply.deltas():
                parts.append(delta.text)
            text = "".join(parts)
            await reply.close(text, interrupted=False)
            stored = True
        except ApiError as error:
            await reply.release(failure(error, task.request_id if task else None))
            raise
        finally:
            if not stored:
                # Cancelled: the client left before the answer was sent, so it heard nothing.
                await reply.close("", interrupted=True)
        return completion_body(
            reply.completion_id, reply.model, text, reply.finish_reason, reply.usage, reply.client_calls
        )


async def sse_events(reply: LiveRound | Replay) -> AsyncGenerator[bytes, None]:
    """The SSE body of a streamed answer. Events that are ready together go out in one write: the
    role with the first text, the closing events together. A chunk counts as sent once the SSE
    response asks for the next one, which it does only after writing the previous one."""
    writer = ChunkWriter(reply.completion_id, reply.model)
    if isinstance(reply, Replay):
        yield _events(
            writer.role(),
            *([writer.content(reply.text)] if reply.text else []),
            *([writer.tool_calls(reply.tool_calls)] if reply.tool_calls else []),
            *_closing(writer, reply.finish_reason, reply.usage if reply.include_usage else None),
        )
        return

    sent: list[str] = []
    unsent = [writer.role()]
    try:
        async for delta in reply.deltas():
            if delta.text:
                yield _events(*unsent, writer.content(delta.text))
                unsent = []
                sent.append(delta.text)
        # Stored before the closing events, so the task's next round never waits on this one.
        await reply.close("".join(sent), interrupted=False)
        if reply.client_calls:
            unsent.append(writer.tool_calls(reply.client_calls))
        usage = reply.usage if reply.include_usage else None
        yield _events(*unsent, *_closing(writer, reply.finish_reason, usage))
    except ApiError as error:
        log.warning("upstream failed mid-stream: %s", error.message)
        await reply.close("".join(sent), interrupted=True, error=error.code or "upstream_failed")
        yield _events(*unsent, error_event(error))
    finally:
        # Client gone (cancelled, or the generator closed): keep what it received.
        await reply.close("".join(sent), interrupted=True)


async def close_unsent(reply: LiveRound | Replay) -> None:
    """After a streamed answer, whatever happened: a round whose events never started (the client
    left between the first token and the first write) is stored as heard by nobody; otherwise
    `sse_events` stored it already and this does nothing."""
    if isinstance(reply, LiveRound):
        await reply.close("", interrupted=True)


async def _first(calls: list[UpstreamCall], context: list[BaseMessage]) -> Started:
    """Call the profile's upstreams in turn until one gives its first token: the next is tried
    when one fails before it (unreachable, 5xx, 429, timeout) or stays silent past
    `first_token_timeout_s` (the last one is given its full time). Once the first token is out
    there is no going back: the words are spoken."""
    for attempt, call in enumerate(calls):
        last = attempt == len(calls) - 1
        stream = call.stream(context)
        try:
            first = await _first_delta(stream, None if last else call.first_token_timeout_s)
        except (ApiError, TimeoutError) as error:
            await _close_quietly(stream)
            code = error.code if isinstance(error, ApiError) else "first_token_timeout"
            LLM_UPSTREAM_ERRORS.labels(code or "unknown").inc()
            if last or code not in _FALL_BACK_ON:
                raise
            LLM_FALLBACKS.labels(call.profile or "", code).inc()
            log.warning("upstream %s: %s; trying %s", call.upstream_label, code, calls[attempt + 1].upstream_label)
            continue
        except BaseException:
            await _close_quietly(stream)
            raise
        return call, stream, first
    raise AssertionError("unreachable: the last upstream returns or raises")


async def _first_delta(stream: AsyncGenerator[Delta, None], timeout: float | None) -> Delta:
    """The upstream's first text or tool call. A 200 that brings neither (no choices, empty
    text) is no answer: an upstream failure, which a fallback may make up for."""

    async def first() -> Delta:
        async for delta in stream:
            if delta.text or delta.calls:
                return delta
        raise ApiError(502, "Upstream answered with no text and no tool call.", "upstream_error", "upstream_invalid")

    return await (first() if timeout is None else asyncio.wait_for(first(), timeout))


async def _close_quietly(stream: AsyncGenerator[Delta, None]) -> None:
    with anyio.CancelScope(shield=True):
        try:
            await stream.aclose()
        except Exception:  # the stream already failed; its error is the one being handled
            pass


def failure(exc: BaseException, request_id: str | None) -> Failure:
    """What operators see of a request that failed before its round had an answer."""
    if isinstance(exc, ApiError):
        return Failure(exc.code or exc.type, exc.message, request_id)
    return Failure("internal_error", type(exc).__name__, request_id)


def _closing(writer: ChunkWriter, finish_reason: str, usage: dict[str, int] | None) -> list[str]:
    return [writer.finish(finish_reason), *([writer.usage(usage)] if usage else []), "[DONE]"]


def _events(*payloads: str) -> bytes:
    return b"".join(ServerSentEvent(payload, sep="\n").encode() for payload in payloads)


def _answered_before(claim: Claim, turn: Turn) -> Msg | None:
    """For tool results the round already holds (the client retried its request), the reply
    that followed them, to replay."""
    if not turn.continues:
        return None
    answered = {m.get("tool_call_id") for m in claim.stored if m["role"] == "tool"}
    if not {m["tool_call_id"] for m in turn.new} <= answered:
        return None
    return replayed_reply(claim.stored)


def _head(claim: Claim, turn: Turn) -> list[Msg]:
    """The messages the round starts with. A retry of an interrupted round carries over the tool
    calls that finished (they are not run again); tool results continue the round that called the
    client's tools."""
    if claim.regenerate:
        return [*turn.new[claim.repeated :], *finished_tool_exchanges(claim.stored)]
    if not turn.continues:
        return turn.new[claim.repeated :]
    open_ids = {call["id"] for call in unanswered_calls(claim.stored)}
    answered = {m.get("tool_call_id") for m in claim.stored if m["role"] == "tool"}
    given = {m["tool_call_id"] for m in turn.new}
    if given <= open_ids:
        return [*claim.stored, *turn.new]
    raise bad_request(
        f"Tool results for unknown calls {sorted(given - open_ids - answered)}; open calls: {sorted(open_ids)}.",
        "unknown_tool_call",
    )


def _replay(claim: Claim, reply: Msg, call: UpstreamCall) -> Replay:
    return Replay(
        "chatcmpl-" + claim.round_id,
        call.model,
        reply.get("content") or "",
        claim.replay_usage,
        call.include_usage,
        reply.get("tool_calls") or [],
    )
