"""Chat templates as data: one YAML file per LLaMA-Factory template name, plus Jinja files.

This package holds no code; it exists so the files install with the gateway and can be found with
``importlib.resources.files("chat_templates")``.
"""
