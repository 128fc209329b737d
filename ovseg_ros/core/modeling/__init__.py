"""Network definitions of released models ported to plain PyTorch (as segment-anything keeps ``modeling/`` apart
from its predictor). Module and parameter names follow each release's checkpoint keys, so its state dict loads
with ``strict=True``."""
