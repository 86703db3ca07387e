"""Chat templates as data: one YAML file per LLaMA-Factory template name, plus Jinja files.

``<name>.yaml`` mirrors LLaMA-Factory 0.9.5's ``register_template(name=..., ...)`` with the same field names
(``format_user``, ``format_assistant``, ``format_system``, ``format_function``, ``format_observation``,
``format_tools``, ``format_prefix``, ``default_system``, ``stop_words``, ``thought_words``, ``tool_call_words``,
``efficient_eos``, ``replace_eos``, ``enable_thinking``, ``template_class``); fields left out take
``register_template``'s defaults. ``gateway.templates.spec`` documents the slot syntax.

This package holds no code; it exists so the files install with the gateway and can be found with
``importlib.resources.files("chat_templates")``.
"""
