"""The answer layer: what a model's answer holds beyond its text (the price's spread and its calibrated range)."""
