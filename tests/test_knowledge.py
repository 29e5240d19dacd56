"""Knowledge bases (`knowledge/`): documents through the admin API, searched in rounds (auto and
tool mode) through the official client, dense search and its fallback, deletes reaching another
process, and every kind of bad input, on both databases. One in-process proxy per database serves
the module."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from tests.conftest import ADMIN_KEY
from tests.support import API_KEY, InProcessProxy, Upstream, headers, marker, wait_until

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
MAX_MB = 0.05  # 52,428 bytes: the size limit the module's proxy has

GUIDE_MD = """# 星辰音箱用户手册

## 价格与购买

星辰音箱标准版售价 399 元，专业版售价 699 元。官方商城和各大电商平台均有销售。

## 保修政策

星辰音箱提供两年免费保修。人为损坏不在保修范围内；保修期外维修按配件成本收费。

## 常见问题

Q: 音箱无法连接 Wi-Fi 怎么办？
A: 请长按音箱顶部的配对键 5 秒，指示灯闪烁蓝色后在 App 中重新配网。

Q: 如何恢复出厂设置？
A: 同时按住音量加和音量减键 10 秒，听到提示音后松开。
"""

REFUND_MD = """# Refund policy

## Refunds

Refunds are issued within 14 days of purchase to the original payment method. Opened items get a
full refund if returned in their original packaging.

## Shipping

Orders ship within two business days. Express delivery costs 15 dollars.
"""


def _profiles(upstream: Upstream, tag: str) -> str:
    return f"""
profiles:
  - name: plain
    default: true
    tools: []
  - name: kb-auto
    models: [kb-auto]
    tools: []
    knowledge: {{bases: [guide-{tag}, refunds-{tag}], top_k: 2, mode: auto}}
  - name: kb-templated
    models: [kb-templated]
    tools: []
    system_prompt: "Support bot. Facts: {{knowledge}}"
    knowledge: {{bases: [guide-{tag}], top_k: 1}}
  - name: kb-tool
    models: [kb-tool]
    tools: []
    knowledge: {{bases: [refunds-{tag}], mode: tool}}
  - name: kb-dense
    models: [kb-dense]
    tools: []
    knowledge: {{bases: [dense-{tag}], top_k: 1}}
  - name: kb-slow
    models: [kb-slow]
    tools: []
    knowledge: {{bases: [slow-{tag}], top_k: 1}}
knowledge_bases:
  - name: dense-{tag}
    embeddings: {{base_url: "{upstream.base_url}", model: fake-embed, timeout_ms: 2000}}
  - name: slow-{tag}
    embeddings: {{base_url: "{upstream.base_url}", model: "fake-embed[[delay:0.5]]", timeout_ms: 50}}
"""


@pytest.fixture(scope="module")
def kb(migrated_url: str, start_proxy_for_module: Any, upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[InProcessProxy, str]]:
    tag = uuid.uuid4().hex[:8]
    config = tmp_path_factory.mktemp("kb") / "profiles.yaml"
    config.write_text(_profiles(upstream, tag))
    server = start_proxy_for_module(
        {"DATABASE_URL": migrated_url, "CONFIG_FILE": str(config), "ADMIN_API_KEYS": ADMIN_KEY,
         "KNOWLEDGE_MAX_DOCUMENT_MB": str(MAX_MB)},
        in_process=True,
    )
    yield server, tag


def _put(server: InProcessProxy, path: str, body: bytes | str, content_type: str = "text/markdown", **params: str) -> httpx.Response:
    data = body.encode() if isinstance(body, str) else body
    return httpx.put(f"{server.url}/admin/v1/knowledge/{path}", content=data, params=params,
                     headers={**ADMIN, "Content-Type": content_type}, timeout=30)


def _search(server: InProcessProxy, base: str, query: str, **extra: Any) -> httpx.Response:
    return httpx.post(f"{server.url}/admin/v1/knowledge/{base}/search", json={"query": query, **extra}, headers=ADMIN)


def _admin(server: InProcessProxy, method: str, path: str) -> httpx.Response:
    return httpx.request(method, f"{server.url}/admin/v1/{path}", headers=ADMIN)


def test_documents_in_searched_replaced_and_deleted(kb: tuple[InProcessProxy, str]) -> None:
    server, tag = kb
    base = f"guide-{tag}"
    first = _put(server, f"{base}/documents/manual", GUIDE_MD, title="Manual")
    assert first.status_code == 201, first.text
    assert first.json()["base"] == base and first.json()["id"] == "manual" and first.json()["chunks"] >= 4
    doc = _admin(server, "GET", f"knowledge/{base}/documents/manual").json()
    # Each FAQ pair is one chunk; each chunk carries its heading path.
    pairs = [c for c in doc["chunks"] if c["text"].startswith("Q:")]
    assert len(pairs) == 2 and all("A:" in c["text"] for c in pairs)
    assert all(c["heading"].startswith("星辰音箱用户手册") for c in doc["chunks"])
    assert any(c["heading"] == "星辰音箱用户手册 > 保修政策" for c in doc["chunks"])

    hits = _search(server, base, "保修多久").json()["results"]
    assert hits and "两年免费保修" in hits[0]["text"] and 0 < hits[0]["score"] <= 1
    assert {"document", "chunk", "text", "score"} <= set(hits[0])
    assert "长按音箱顶部的配对键" in _search(server, base, "音响连不上wifi").json()["results"][0]["text"]

    # The same text again: the same chunk ids; the document is replaced, not doubled.
    again = _put(server, f"{base}/documents/manual", GUIDE_MD, title="Manual")
    assert again.status_code == 200 and again.json()["replaced"] is True
    assert [c["id"] for c in _admin(server, "GET", f"knowledge/{base}/documents/manual").json()["chunks"]] == [
        c["id"] for c in doc["chunks"]
    ]
    listed = {b["name"]: b for b in _admin(server, "GET", "knowledge").json()["data"]}
    assert listed[base]["documents"] == 1 and listed[base]["chunks"] == first.json()["chunks"]

    _put(server, f"{base}/documents/extra", "# Extra\n\n星辰音箱支持蓝牙 5.3。")
    assert [d["id"] for d in _admin(server, "GET", f"knowledge/{base}/documents").json()["data"]] == ["extra", "manual"]
    assert _admin(server, "DELETE", f"knowledge/{base}/documents/extra").json()["deleted"]["documents"] == ["extra"]
    assert not any("蓝牙" in h["text"] for h in _search(server, base, "蓝牙").json()["results"])
    assert _admin(server, "DELETE", f"knowledge/{base}/documents/extra").status_code == 404


def test_html_and_pdf_give_their_text(kb: tuple[InProcessProxy, str]) -> None:
    server, tag = kb
    base = f"formats-{tag}"
    html = ("<html><head><title>Help page</title><script>var secret='SCRIPTWORD';</script><style>p{color:red}</style></head>"
            "<body><nav>Home | NAVWORD</nav><h1>Battery</h1><p>The battery lasts 12 hours.</p>"
            "<footer>FOOTERWORD</footer></body></html>")
    stored = _put(server, f"{base}/documents/page", html, "text/html; charset=utf-8")
    assert stored.status_code == 201 and stored.json()["title"] == "Help page"
    text = json.dumps(_admin(server, "GET", f"knowledge/{base}/documents/page").json()["chunks"])
    assert "battery lasts 12 hours" in text
    assert not any(word in text for word in ("SCRIPTWORD", "NAVWORD", "FOOTERWORD", "color:red"))
    assert _put(server, f"{base}/documents/pdf", _pdf("x"), "application/octet-stream").status_code == 415
    pdf = _put(server, f"{base}/documents/pdf", _pdf("Warranty covers two years"), "application/pdf")
    assert pdf.status_code == 201, pdf.text
    assert "two years" in _search(server, base, "warranty").json()["results"][0]["text"]


def _pdf(text: str) -> bytes:
    """A one-page PDF with one line of Helvetica text, written by hand (byte offsets and all)."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = b"%PDF-1.4\n"
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return out


def test_bad_input_is_refused_with_its_reason_never_a_5xx(kb: tuple[InProcessProxy, str]) -> None:
    server, tag = kb
    base = f"bad-{tag}"
    too_big = _put(server, f"{base}/documents/big", "长" * 30_000)  # 90,000 bytes of UTF-8
    assert too_big.status_code == 413 and "52428" in too_big.json()["error"]["message"]
    assert _put(server, f"{base}/documents/x", b"\x00\x01", "image/png").status_code == 415
    assert _put(server, f"{base}/documents/x", "no content type", "").status_code == 415
    assert _put(server, f"{base}/documents/x", b"not a pdf at all", "application/pdf").json()["error"]["code"] == "invalid_pdf"
    assert _put(server, f"{base}/documents/x", b"%PDF-1.4\ngarbage\x00\xff", "application/pdf").status_code == 400
    assert _put(server, f"{base}/documents/x", "   \n\n  ").json()["error"]["code"] == "no_text"
    assert _put(server, f"{base}/documents/x", "<script>only()</script>", "text/html").status_code == 400
    for bad_id in ("a b", "-x", "x" * 200, ".hidden", "a:b", "名字"):
        assert _put(server, f"{base}/documents/{bad_id}", "text").json()["error"]["code"] == "invalid_document_id", bad_id
    assert _put(server, "b%20ad/documents/x", "text").json()["error"]["code"] == "invalid_base_name"
    # What PostgreSQL refuses (NUL, lone surrogates) never reaches it: cleaned, not a 5xx.
    stored = _put(server, f"{base}/documents/ok", "some\x00 text", "text/plain", title="a\x00b\nc")
    assert stored.status_code == 201 and stored.json()["title"] == "ab c", stored.text
    for body in ({"query": ""}, {"query": "x" * 2001}, {"query": "x", "top_k": 0}, {"query": "x", "top_k": 1000},
                 {"query": 5}, {"top_k": 3}, {"query": "x", "nope": 1}):
        response = httpx.post(f"{server.url}/admin/v1/knowledge/{base}/search", json=body, headers=ADMIN)
        assert response.status_code == 400, body
    assert httpx.post(f"{server.url}/admin/v1/knowledge/{base}/search", content=b"{", headers=ADMIN).status_code == 400
    assert _search(server, f"none-{tag}", "x").status_code == 404
    assert _admin(server, "DELETE", f"knowledge/none-{tag}").status_code == 404
    # The chat keys open nothing here.
    chat = {"Authorization": f"Bearer {API_KEY}"}
    assert httpx.get(f"{server.url}/admin/v1/knowledge", headers=chat).status_code == 401
    assert httpx.put(f"{server.url}/admin/v1/knowledge/{base}/documents/y", content=b"t", headers=chat).status_code == 401
    assert httpx.post(f"{server.url}/admin/v1/knowledge/{base}/search", json={"query": "t"}, headers=chat).status_code == 401


def _chat(server: InProcessProxy, model: str, task: str, request_id: str, text: str) -> str:
    reply = server.client().chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], extra_headers=headers(task, request_id)
    )
    return reply.choices[0].message.content or ""


def _sent(upstream: Upstream, mark: str) -> list[dict[str, Any]]:
    return upstream.requests(mark)[-1]["messages"]


def test_auto_mode_gives_each_turn_its_own_passages_and_records_them(kb: tuple[InProcessProxy, str], upstream: Upstream) -> None:
    server, tag = kb
    assert _put(server, f"guide-{tag}/documents/manual", GUIDE_MD).status_code in (200, 201)
    assert _put(server, f"refunds-{tag}/documents/policy", REFUND_MD).status_code in (200, 201)
    task = f"kb-{uuid.uuid4().hex}"
    first = marker()
    _chat(server, "kb-auto", task, "r1", f"星辰音箱的保修政策是什么？ {first}")
    sent = _sent(upstream, first)
    # The passages sit in a system section just before the user's turn.
    assert sent[-1]["role"] == "user" and sent[-2]["role"] == "system"
    assert "两年免费保修" in sent[-2]["content"] and "never read out" in sent[-2]["content"]

    # A short follow-up is searched with the turn before it; the old passages are gone.
    second = marker()
    _chat(server, "kb-auto", task, "r2", f"那价格呢 {second}")
    sent = _sent(upstream, second)
    section = sent[-2]["content"]
    assert sent[-2]["role"] == "system" and "399" in section
    assert not any(m["role"] == "system" and "两年免费保修" in (m.get("content") or "") for m in sent[:-2])

    # Small talk is not searched.
    _chat(server, "kb-auto", task, "r3", "好的！")
    assert upstream.requests("好的！")[-1]["messages"][-2]["role"] == "assistant"

    detail = _admin(server, "GET", f"tasks/{task}").json()
    used = [r["knowledge"] for r in detail["rounds"]]
    assert used[0] and used[0][0]["base"] == f"guide-{tag}" and used[0][0]["document"] == "manual"
    assert set(used[0][0]) == {"base", "document", "chunk", "score"}
    assert used[1] and used[2] is None
    # The history the next round reads holds no passages.
    assert not any("Knowledge for" in json.dumps(r["messages"], ensure_ascii=False) for r in detail["rounds"])


def test_the_template_can_place_the_passages(kb: tuple[InProcessProxy, str], upstream: Upstream) -> None:
    server, tag = kb
    _put(server, f"guide-{tag}/documents/manual", GUIDE_MD)
    mark = marker()
    _chat(server, "kb-templated", f"kb-{uuid.uuid4().hex}", "r1", f"如何恢复出厂设置 {mark}")
    sent = _sent(upstream, mark)
    assert sent[0]["role"] == "system" and sent[0]["content"].startswith("Support bot. Facts: ")
    assert "音量加和音量减键" in sent[0]["content"]
    assert [m["role"] for m in sent] == ["system", "user"]


def test_tool_mode_lets_the_model_search(kb: tuple[InProcessProxy, str], upstream: Upstream) -> None:
    server, tag = kb
    _put(server, f"refunds-{tag}/documents/policy", REFUND_MD)
    task = f"kb-{uuid.uuid4().hex}"
    mark = marker()
    reply = _chat(server, "kb-tool", task, "r1", f'[[tool:search_knowledge:{{"query": "refund opened items"}}]] {mark}')
    assert "full refund" in reply
    tools = upstream.requests(mark)[0]["tools"]
    assert [t["function"]["name"] for t in tools] == ["search_knowledge"]
    # Tool mode puts nothing before the turn.
    assert not any("Knowledge for" in (m.get("content") or "") for m in upstream.requests(mark)[0]["messages"])
    used = _admin(server, "GET", f"tasks/{task}").json()["rounds"][0]["knowledge"]
    assert used and used[0]["document"] == "policy"


def test_dense_search_is_fused_and_a_slow_embedder_leaves_lexical(kb: tuple[InProcessProxy, str], upstream: Upstream) -> None:
    server, tag = kb
    stored = _put(server, f"dense-{tag}/documents/policy", REFUND_MD)
    assert stored.json()["embedded"] is True
    doc = _admin(server, "GET", f"knowledge/dense-{tag}/documents/policy").json()
    assert all(c["embedded"] for c in doc["chunks"])
    hits = _search(server, f"dense-{tag}", "how fast do orders ship").json()["results"]
    assert "two business days" in hits[0]["text"]
    # Each batch of chunks was one request to the embedder.
    assert any(isinstance(body.get("input"), list) and body["model"] == "fake-embed" for body in upstream.requests(""))

    _put(server, f"slow-{tag}/documents/policy", REFUND_MD)
    mark = marker()
    _chat(server, "kb-slow", f"kb-{uuid.uuid4().hex}", "r1", f"refund for opened items {mark}")
    assert "full refund" in _sent(upstream, mark)[-2]["content"]
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'trtc_knowledge_lexical_only_total{model="fake-embed[[delay:0.5]]"}' in metrics


def test_a_failing_embedder_stores_nothing(kb: tuple[InProcessProxy, str], upstream: Upstream, tmp_path: Path,
                                           migrated_url: str, start_proxy: Any) -> None:
    server, tag = kb
    config = tmp_path / "failing.yaml"
    config.write_text(f"""
profiles: [{{name: p, default: true}}]
knowledge_bases:
  - name: broken-{tag}
    embeddings: {{base_url: "{upstream.base_url}", model: "e[[status:500]]"}}
""")
    other = start_proxy({"DATABASE_URL": migrated_url, "CONFIG_FILE": str(config), "ADMIN_API_KEYS": ADMIN_KEY},
                        in_process=True)
    failed = _put(other, f"broken-{tag}/documents/d", REFUND_MD)
    assert failed.status_code == 502 and failed.json()["error"]["code"] == "embeddings_failed"
    assert _admin(other, "GET", f"knowledge/broken-{tag}/documents/d").status_code == 404


def test_a_delete_reaches_another_process_within_a_second(kb: tuple[InProcessProxy, str], migrated_url: str,
                                                          start_proxy: Any, tmp_path: Path, upstream: Upstream) -> None:
    server, tag = kb
    config = tmp_path / "profiles.yaml"
    config.write_text(_profiles(upstream, tag))
    other = start_proxy({"DATABASE_URL": migrated_url, "CONFIG_FILE": str(config), "ADMIN_API_KEYS": ADMIN_KEY})
    base = f"shared-{tag}"
    _put(server, f"{base}/documents/a", "# A\n\nThe secret word is PINEAPPLE.")
    wait_until(lambda: _search(other, base, "secret word").status_code == 200 and _search(other, base, "secret word").json()["results"],
               timeout=5, what="the other process to see the document")
    _put(server, f"{base}/documents/a", "# A\n\nThe secret word is MANGO.")
    # Polled every 0.5 s: within a second, with room for a busy machine (the suite runs on both cores).
    wait_until(lambda: "MANGO" in _search(other, base, "secret word").json()["results"][0]["text"], timeout=2.5,
               what="the replacement to reach the other process")
    _admin(server, "DELETE", f"knowledge/{base}")
    wait_until(lambda: _search(other, base, "secret word").status_code == 404, timeout=2.5,
               what="the delete to reach the other process")


def test_the_cli_adds_lists_searches_and_deletes(kb: tuple[InProcessProxy, str], migrated_url: str, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from app.cli import cli
    from core.settings import get_settings

    server, tag = kb
    base = f"cli-{tag}"
    (tmp_path / "Refund Policy.md").write_text(REFUND_MD)
    (tmp_path / "guide.txt").write_text("星辰音箱提供两年免费保修。")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    env = {"DATABASE_URL": migrated_url}

    def run(*args: str) -> Any:
        # The command reads its settings once per process (cached): as from a fresh shell.
        get_settings.cache_clear()
        try:
            return CliRunner().invoke(cli, ["knowledge", *args], env=env)
        finally:
            get_settings.cache_clear()

    added = run("add", base, str(tmp_path / "Refund Policy.md"), str(tmp_path / "guide.txt"))
    assert added.exit_code == 0, added.output
    assert f"{base}/Refund-Policy: added" in added.output and f"{base}/guide: added" in added.output
    assert run("add", base, str(tmp_path / "image.png")).exit_code == 1
    assert "Refund-Policy" in run("list", base).output and base in run("list").output
    found = run("search", base, "how long is the warranty 保修")
    assert found.exit_code == 0 and "两年免费保修" in found.output
    # The server sees what the CLI wrote.
    wait_until(lambda: _search(server, base, "保修").status_code == 200, timeout=10, what="the server to see the base")
    assert run("delete", base, "guide").exit_code == 0
    assert run("delete", base, "guide").exit_code == 1
    assert run("delete", base).output.startswith(f"deleted {base} (1 documents)")
    assert run("list", base).exit_code == 1
