"""Inference backends behind the gateway: native torch and HTTP upstreams (vLLM, LMDeploy, Ollama, OpenAI)."""
