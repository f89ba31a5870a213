"""Sink runtime: consumes one channel's intents and delivers them through its connector."""
