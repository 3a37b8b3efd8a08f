"""Speed: TTFT, prompt and decode tokens/s and peak memory per engine, side by side with the peers (speed.py)."""
