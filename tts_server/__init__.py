"""Streaming TTS server for the orchestrator's custom TTS (not built yet)."""
