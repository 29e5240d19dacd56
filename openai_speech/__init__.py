"""OpenAI's speech API (`POST /v1/audio/speech`, `GET /v1/audio/voices`) on the TTS server's engine."""
