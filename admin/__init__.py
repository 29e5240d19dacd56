"""The operators' view: an admin API over the stored conversations."""
