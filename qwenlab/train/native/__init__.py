"""SFT on qwenlab's own model core (`engine: native`): batches.py makes TRL's examples, sft.py runs the loop."""
