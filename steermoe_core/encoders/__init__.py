"""Frozen audio encoders: each exposes dims, a masked forward with a per-layer hook, and a final norm."""
