"""Scoring: metrics (WER, CER, QA), dataset decoding for `steermoe eval`, and Whisper's own decoder as a yardstick."""
