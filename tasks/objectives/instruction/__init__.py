"""Task instruction: chat data in any common format, rendered with a chat template, loss on the responses only.

`settings` (its `instruction:` section and row formats), `chat` (formats, templates, encoding), `objective` (the
record the registry lists).
"""
