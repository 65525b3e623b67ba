"""Storage: SQLModel tables, engines and the Core queries of the hot paths."""
