"""The Lightning side: data modules, the partial fine-tune, the layer-wise compensation, logging, and their configs
(importable without Lightning)."""
