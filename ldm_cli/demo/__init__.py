"""The built-in model: its world (scenes), its judge (evaluate, gate), its shape (architecture)
and its training recipe (train)."""
