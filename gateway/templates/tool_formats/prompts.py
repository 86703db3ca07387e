"""The tool prompts each tool format appends to the system text, as ``str.format`` patterns.

Data copied byte for byte from LLaMA-Factory 0.9.5 (``llamafactory/data/tool_utils.py``, ``*_TOOL_PROMPT``), because
models were trained on exactly this text. ``{tool_text}`` (and ``{tool_names}``, ``{date}``) are filled in; doubled
braces are literal braces.
"""

DEFAULT_TOOL_PROMPT = (
    'You have access to the following tools:\n'
    '{tool_text}Use the following format if using a tool:\n'
    '```\n'
    'Action: tool name (one of [{tool_names}])\n'
    'Action Input: the input to the tool, in a JSON format representing the kwargs (e.g. ```{{"input": "hello '
    'world", "num_beams": 5}}```)\n'
    '```\n'
)

GLM4_TOOL_PROMPT = (
    '你是一个名为 ChatGLM 的人工智能助手。你是基于智谱 AI 公司训练的语言模型 GLM-4 模型开发的，'
    '你的任务是针对用户的问题和要求提供适当的答复和支持。\n'
    '\n'
    '# 可用工具{tool_text}'
)

# One tool in GLM4_TOOL_PROMPT's {tool_text}.
GLM4_TOOL_ITEM = "\n\n## {name}\n\n{body}\n在调用上述函数时，请使用 Json 格式表示调用的参数。"

GLM4_MOE_TOOL_PROMPT = (
    '\n'
    '\n'
    '# Tools\n'
    '\n'
    'You may call one or more functions to assist with the user query.\n'
    '\n'
    'You are provided with function signatures within <tools></tools> XML tags:\n'
    '<tools>{tool_text}\n'
    '</tools>\n'
    '\n'
    'For each function call, output the function name and arguments within the following XML format:\n'
    '<tool_call>{{function-name}}\n'
    '<arg_key>{{arg-key-1}}</arg_key>\n'
    '<arg_value>{{arg-value-1}}</arg_value>\n'
    '<arg_key>{{arg-key-2}}</arg_key>\n'
    '<arg_value>{{arg-value-2}}</arg_value>\n'
    '...\n'
    '</tool_call>\n'
)

LLAMA3_TOOL_PROMPT = (
    'Cutting Knowledge Date: December 2023\n'
    'Today Date: {date}\n'
    '\n'
    'You have access to the following functions. To call a function, please respond with JSON for a function '
    'call. Respond in the format {{"name": function name, "parameters": dictionary of argument name and its '
    'value}}. Do not use variables.\n'
    '\n'
    '{tool_text}'
)

MINIMAX_M1_TOOL_PROMPT = (
    'You are provided with these tools:\n'
    '<tools>\n'
    '{tool_text}</tools>\n'
    '\n'
    'If you need to call tools, please respond with <tool_calls></tool_calls> XML tags, and provide tool-name '
    'and json-object of arguments, following the format below:\n'
    '<tool_calls>\n'
    '{{"name": <tool-name-1>, "arguments": <args-json-object-1>}}\n'
    '...\n'
    '</tool_calls>'
)

MINIMAX_M2_TOOL_PROMPT = (
    '\n'
    '\n'
    '# Tools\n'
    '\n'
    'You may call one or more tools to assist with the user query.\n'
    'Here are the tools available in JSONSchema format:\n'
    '\n'
    '<tools>\n'
    '{tool_text}</tools>\n'
    '\n'
    'When making tool calls, use XML format to invoke tools and pass parameters:\n'
    '\n'
    '<minimax:tool_call>\n'
    '<invoke name="tool-name-1">\n'
    '<parameter name="param-key-1">param-value-1</parameter>\n'
    '<parameter name="param-key-2">param-value-2</parameter>\n'
    '...\n'
    '</invoke>\n'
    '</minimax:tool_call>'
)

QWEN_TOOL_PROMPT = (
    '\n'
    '\n'
    '# Tools\n'
    '\n'
    'You may call one or more functions to assist with the user query.\n'
    '\n'
    'You are provided with function signatures within <tools></tools> XML tags:\n'
    '<tools>{tool_text}\n'
    '</tools>\n'
    '\n'
    'For each function call, return a json object with function name and arguments within '
    '<tool_call></tool_call> XML tags:\n'
    '<tool_call>\n'
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n'
    '</tool_call>'
)

SEED_TOOL_PROMPT = (
    'system\n'
    'You are Doubao, a helpful AI assistant. You may call one or more functions to assist with the user '
    'query.Tool List:\n'
    'You are authorized to use the following tools (described in JSON Schema format). Before performing any '
    'task, you must decide how to call them based on the descriptions and parameters of these tools.{tool_text}\n'
    '工具调用请遵循如下格式:\n'
    '<seed:tool_call>\n'
    '<function=example_function_name>\n'
    '<parameter=example_parameter_1>value_1</parameter>\n'
    '<parameter=example_parameter_2>This is the value for the second parameter\n'
    'that can span\n'
    'multiple lines</parameter>\n'
    '</function>\n'
    '</seed:tool_call>\n'
)

LING_TOOL_PROMPT = (
    '# Tools\n'
    '\n'
    'You may call one or more functions to assist with the user query.\n'
    '\n'
    'You are provided with function signatures within <tools></tools> XML tags:\n'
    '<tools>{tool_text}\n'
    '</tools>\n'
    '\n'
    'For each function call, return a json object with function name and arguments within '
    '<tool_call></tool_call> XML tags:\n'
    '<tool_call>\n'
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n'
    '</tool_call>'
)

LFM2_TOOL_PROMPT = (
    'List of tools: <|tool_list_start|>{tool_text}<|tool_list_end|>'
)
