"""The modules a compressed model is made of (factorized linears, COMCAT's factorized attention, 8-bit weights) and the
adapter, the one place that knows timm's module paths."""
