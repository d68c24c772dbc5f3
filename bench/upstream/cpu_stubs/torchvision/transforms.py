"""`Resize` for tok/ta_tok.py's import; building one fails (no torchvision in this environment)."""


class Resize:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("torchvision is not installed in the BLIP3o-NEXT benchmark environment")
