"""``pplfast serve``: a scoring server (OpenAI completions, SGLang generate, native score and
compare endpoints) over pplfast's fused head. See docs/serve.md."""
