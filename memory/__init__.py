"""Memory beyond the history window: a task's rolling summary, and each end user's memory across
their tasks."""
