"""Examples -> token ids with a loss mask, for SFT (prompt/completion, messages or text), DPO
(prompt/chosen/rejected) and GRPO (prompt plus any columns).

Prompt and completion are tokenized separately and concatenated, so the boundary between them (what
``completion_only_loss`` masks) is exact whatever the tokenizer's merges would do across it. Conversational
fields (a list of ``{"role", "content"}``) go through the tokenizer's chat template.
"""

from __future__ import annotations

from typing import Any


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _chat(tokenizer, messages: list[dict], *, generation_prompt: bool) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("conversational data needs a tokenizer with a chat template; this one has none")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value)


def prompt_text(tokenizer, prompt: str | list[dict]) -> str:
    """A plain prompt as is; a conversation rendered with the chat template and its generation prompt."""
    if isinstance(prompt, str):
        return prompt
    if _is_messages(prompt):
        return _chat(tokenizer, prompt, generation_prompt=True)
    raise ValueError(f"prompt must be a string or a list of chat messages, got {type(prompt).__name__}")


def encode_prompt(tokenizer, prompt: str | list[dict], max_prompt_length: int) -> list[int]:
    """Prompt ids, keeping the last ``max_prompt_length`` tokens (the end of a prompt matters most)."""
    ids = encode(tokenizer, prompt_text(tokenizer, prompt))
    return ids[-max_prompt_length:]


def encode_completion(tokenizer, prompt: str | list[dict], completion: str | list[dict]) -> list[int]:
    """Completion ids ending in EOS. A conversational completion is what the chat template renders after
    the prompt's generation prompt (its end-of-turn token included)."""
    if isinstance(completion, str):
        return encode(tokenizer, completion) + [tokenizer.eos_token_id]
    if _is_messages(completion) and _is_messages(prompt):
        head = _chat(tokenizer, prompt, generation_prompt=True)
        full = _chat(tokenizer, prompt + completion, generation_prompt=False)
        if not full.startswith(head):
            raise ValueError("the chat template renders the prompt differently once a completion follows it")
        return encode(tokenizer, full[len(head) :])
    raise ValueError(
        f"completion must be a string, or chat messages after a conversational prompt; got "
        f"{type(completion).__name__}"
    )


def encode_messages(tokenizer, messages: list[dict], *, assistant_only: bool) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of a conversation. With ``assistant_only`` the mask covers exactly what the chat
    template renders for each assistant turn after its generation prompt (end-of-turn token included)."""
    if not _is_messages(messages):
        raise ValueError("messages must be a list of {'role', 'content'} dicts")
    ids: list[int] = []
    mask: list[int] = []
    done = ""  # text rendered so far

    def add(text: str, flag: int):
        piece = encode(tokenizer, text)
        ids.extend(piece)
        mask.extend([flag] * len(piece))

    for i, msg in enumerate(messages):
        if msg["role"] != "assistant" or not assistant_only:
            continue
        if i == 0:
            raise ValueError("messages: an assistant turn needs a preceding user/system turn")
        head = _chat(tokenizer, messages[:i], generation_prompt=True)
        upto = _chat(tokenizer, messages[: i + 1], generation_prompt=False)
        if not (head.startswith(done) and upto.startswith(head)):
            raise ValueError("the chat template is not prefix-stable; assistant_only_loss cannot be used")
        add(head[len(done) :], 0)
        add(upto[len(head) :], 1)
        done = upto
    full = _chat(tokenizer, messages, generation_prompt=False)
    if not full.startswith(done):
        raise ValueError("the chat template is not prefix-stable; assistant_only_loss cannot be used")
    add(full[len(done) :], 0 if assistant_only else 1)
    return ids, mask


def sft_example(
    tokenizer,
    example: dict,
    *,
    max_length: int,
    completion_only_loss: bool | None,
    assistant_only_loss: bool,
    formatting_func=None,
) -> dict:
    """One SFT example -> ``{"input_ids", "loss_mask"}``.

    ``formatting_func(example)`` may return a string (plain text, loss on every token) or a dict with
    ``prompt`` and ``completion`` (the completion mask then follows the formatted prompt exactly).
    ``completion_only_loss`` None means: on for prompt/completion data.
    """
    if formatting_func is not None:
        out = formatting_func(example)
        example = {"text": out} if isinstance(out, str) else {**example, **out}
    if "prompt" in example and "completion" in example:
        p = encode(tokenizer, prompt_text(tokenizer, example["prompt"]))
        c = encode_completion(tokenizer, example["prompt"], example["completion"])
        only = True if completion_only_loss is None else completion_only_loss
        ids, mask = p + c, [0 if only else 1] * len(p) + [1] * len(c)
    elif "messages" in example:
        ids, mask = encode_messages(tokenizer, example["messages"], assistant_only=assistant_only_loss)
    elif "text" in example:
        if completion_only_loss:
            raise ValueError(
                "completion_only_loss=True needs prompt/completion data (or a formatting_func returning "
                "{'prompt', 'completion'}); this example is plain text"
            )
        ids = encode(tokenizer, example["text"]) + [tokenizer.eos_token_id]
        mask = [1] * len(ids)
    else:
        raise ValueError(
            f"SFT example needs 'prompt'+'completion', 'messages' or 'text'; it has {sorted(example)}"
        )
    return {"input_ids": ids[:max_length], "loss_mask": mask[:max_length]}


def split_conversation(prompt, completion):
    """(prompt, completion) with an implicit prompt made explicit: a completion given as a whole
    conversation (user turns included, as in many preference datasets) is split after its last non-assistant
    turn; a plain-text prompt before a conversational completion becomes one user turn."""
    if _is_messages(completion):
        cut = [i for i, m in enumerate(completion) if m["role"] != "assistant"]
        if cut:
            return completion[: cut[-1] + 1], completion[cut[-1] + 1 :]
        if isinstance(prompt, str):
            return [{"role": "user", "content": prompt}], completion
    return prompt, completion


def dpo_example(tokenizer, example: dict, *, max_prompt_length: int, max_length: int) -> dict:
    """One preference pair -> ``{"prompt_ids", "chosen_ids", "rejected_ids"}``; the prompt keeps its last
    ``max_prompt_length`` tokens and each completion is cut so prompt+completion fits ``max_length``."""
    prompt, chosen = split_conversation(example.get("prompt", ""), example["chosen"])
    _, rejected = split_conversation(example.get("prompt", ""), example["rejected"])
    prompt_ids = encode_prompt(tokenizer, prompt, max_prompt_length)
    room = max(1, max_length - len(prompt_ids))
    return {
        "prompt_ids": prompt_ids,
        "chosen_ids": encode_completion(tokenizer, prompt, chosen)[:room],
        "rejected_ids": encode_completion(tokenizer, prompt, rejected)[:room],
    }
