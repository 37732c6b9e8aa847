"""Evaluation: perplexity, the lm-eval bridge, GLUE tasks and metrics, reports and figures."""
