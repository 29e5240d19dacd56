"""The orchestrator's third channel: its server callbacks (events 901-909), and what they change."""
