"""Stand-in for torchvision in BLIP3o-NEXT's environment (bench/upstream/requirements.txt says why).

The fork imports `torchvision.transforms.Resize` at module load (tok/ta_tok.py, TA-Tok's image
tokenizer) and never uses it in GRPO; anything that does use it fails loudly here."""
