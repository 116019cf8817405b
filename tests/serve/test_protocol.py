"""Chat messages -> the encoder's prompt, and the strictness of request parsing."""

import pytest
from pydantic import ValidationError

from slmctl.data.tokenizer import load_hf_tokenizer
from slmctl.serve.protocol import ChatRequest, CompletionRequest, Message, render_chat


def messages(*pairs):
    return [Message(role=role, content=content) for role, content in pairs]


def test_one_user_message_is_the_prompt_and_a_conversation_gets_role_lines():
    assert render_chat(messages(("user", "Where does Ana live?")), tokenizer=None) == ("Where does Ana live?", [])
    prompt, _ = render_chat(messages(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"), ("user", "Who?")), None)
    assert prompt == "System: Be brief.\nUser: Hi\nAssistant: Hello\nUser: Who?\nAssistant:"


def test_image_parts_become_placeholders_in_order():
    content = [{"type": "text", "text": "Compare"}, {"type": "image_url", "image_url": {"url": "a.png"}},
               {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    prompt, images = render_chat([Message(role="user", content=content)], None)
    assert prompt == "Compare\n<image>\n<image>" and images == ["a.png", "data:image/png;base64,AAAA"]


def test_a_tokenizer_with_a_chat_template_renders_the_messages(llama_dir):
    tokenizer = load_hf_tokenizer(str(llama_dir))
    tokenizer.backend.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                                       "{% if add_generation_prompt %}[assistant]{% endif %}")
    prompt, _ = render_chat(messages(("system", "Be brief."), ("user", "Hi")), tokenizer)
    assert prompt == "[system] Be brief.\n[user] Hi\n[assistant]"


@pytest.mark.parametrize("body", [
    {"model": "m", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]},
    {"model": "m", "prompt": "x", "presence_penalty": 0.5},
    {"model": "m", "prompt": ["x", "y"]},
    {"model": "m", "prompt": "x", "echo": True},
    {"model": "m", "prompt": "x", "top_p": 0},
])
def test_what_cannot_be_honoured_is_refused_not_ignored(body):
    with pytest.raises(ValidationError):
        CompletionRequest(**body)


def test_neutral_values_of_unsupported_fields_are_accepted():
    request = CompletionRequest(model="m", prompt=["x"], n=1, presence_penalty=0, frequency_penalty=0.0, logprobs=None,
                                stop="\n", user="u")
    assert request.prompt == "x" and request.stops == ("\n",)
    chat = ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}], max_completion_tokens=7, max_tokens=3)
    assert chat.limit == 7
