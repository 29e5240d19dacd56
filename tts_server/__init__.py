"""The streaming TTS server for the orchestrator's custom TTS: text in, chunked audio out."""
