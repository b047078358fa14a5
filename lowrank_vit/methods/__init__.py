"""The registered decomposition methods and Z kinds: what each needs from calibration and how it factors a layer."""
