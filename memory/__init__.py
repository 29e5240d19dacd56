"""Memory beyond the history window: a task's rolling summary of the rounds that left it."""
