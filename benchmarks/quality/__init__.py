"""Quality: how far each precision, format and backend is from float32 (perplexity, top-1 agreement, max
|logit diff|, greedy agreement), and how exactly quantized weights survive loading and export. parity.py and
reference.py hold the measuring code, which tests/test_real_parity.py runs with bounds."""
