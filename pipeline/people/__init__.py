"""State about people, on the log: subscribers, preferences and suppressions in compacted
topics, held by the router as tables (docs/architecture.md, "People")."""
