"""Tests of reflectune/engines: the vLLM engine and the OpenAI-compatible teacher, for real."""
