"""langchain-tests' standard integration tests for ChatFlashMoE on the demo model. Not part of the
default run (the file name does not start with test_): they generate a lot of text on a tiny
model. Run them with `python -m pytest tests/langchain_integration.py`."""
from langchain_tests.integration_tests import ChatModelIntegrationTests

from flashmoe_plugin.adapters.langchain import ChatFlashMoE


class TestChatFlashMoEIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self):
        return ChatFlashMoE

    @property
    def chat_model_params(self):
        return {"model_path": "demo", "n_ctx": 2048, "temperature": 0, "max_tokens": 128}

    @property
    def has_tool_calling(self):
        return True

    @property
    def has_tool_choice(self):
        return True

    @property
    def has_structured_output(self):
        return True

    @property
    def supports_json_mode(self):
        return True

    @property
    def returns_usage_metadata(self):
        return True

    @property
    def supports_image_inputs(self):
        return False
