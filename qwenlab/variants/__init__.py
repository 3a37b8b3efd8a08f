"""Model variants: what each folder is (listing.py, `qwenlab ls`) and the measurements recorded for it (results.py)."""
