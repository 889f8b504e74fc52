"""OpenAI's request bodies as pydantic models: what the server accepts, and nothing else.

Every model forbids unknown fields, so a field this server does not implement (`logit_bias`, `echo`,
`suffix`, `audio`, ...) is a 400 naming it, never silently ignored. Ranges are OpenAI's where it has them;
every number also has a finite range (shown in /openapi.json) that keeps the sampler's float32 arithmetic
finite: a value outside it is a 400 naming the field, a value inside it never a 500. The other APIs' bodies
(anthropic.py, responses_protocol.py) take the same ranges from here.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError

# --- the numbers' ranges -------------------------------------------------------------------------------
# A positive temperature divides the logits in float32: below MIN_TEMPERATURE (1e-300 is 0 in float32) the
# scores overflow to inf and nothing can be sampled. 0 is greedy decoding.
MIN_TEMPERATURE = 1e-6
# The repetition penalty divides or multiplies the seen tokens' scores in float32: kept within 1000x either
# way, scores stay finite even at MIN_TEMPERATURE.
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 1e-3, 1e3
# top_p is compared in float32 on the device (qwen_mlx/sampling/device.py): below float32's range it is 0 there
# and no token stays in play. Any top_p under 1 / vocabulary keeps the top token alone, as MIN_TOP_P does.
MIN_TOP_P = 1e-8
MAX_TOP_K = 2**31 - 1      # any k at or past the vocabulary's size keeps every token
MAX_TOKENS = 2**31 - 1     # the server's --max-tokens bounds it further (a 400 saying so)
MAX_SEED = 2**64 - 1       # numpy's generator takes a non-negative seed


def _temperature_floor(value: float) -> float:
    if 0 < value < MIN_TEMPERATURE:
        raise PydanticCustomError("temperature_range", "should be 0 (greedy decoding) or at least {least}",
                                  {"least": MIN_TEMPERATURE})
    return value


def temperature(most: float) -> Any:
    """A temperature in {0} or [MIN_TEMPERATURE, most]."""
    return Annotated[float, Field(ge=0, le=most, json_schema_extra={
        "anyOf": [{"const": 0}, {"minimum": MIN_TEMPERATURE}]}), AfterValidator(_temperature_floor)]


Temperature = temperature(2)
TopP = Annotated[float, Field(ge=MIN_TOP_P, le=1)]
TopK = Annotated[int, Field(ge=0, le=MAX_TOP_K)]
MinP = Annotated[float, Field(ge=0, lt=1)]
RepetitionPenalty = Annotated[float, Field(ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY)]
Penalty = Annotated[float, Field(ge=-2, le=2)]  # presence and frequency: OpenAI's range
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
TokenCount = Annotated[int, Field(ge=1, le=MAX_TOKENS)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class StreamOptions(Strict):
    include_usage: bool = False


class FunctionDef(Strict):
    name: str = Field(min_length=1, max_length=64)
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDef


class ToolCallFunction(Strict):
    name: str
    arguments: str  # a JSON object, as text


class ToolCall(Strict):
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None
    tool_call_id: Optional[str] = None
    reasoning_content: Optional[str] = None  # an assistant turn's reasoning, as this server returned it


class JsonSchema(Strict):
    name: str = Field(min_length=1, max_length=64)
    description: Optional[str] = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchema] = None


class ToolChoiceFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: ToolChoiceFunction


class SpeculativeOptions(Strict):
    """This server's extension: a request's speculative decoding (qwen_mlx/engine/speculative.py)."""

    method: Literal["prompt-lookup", "draft-model", "mtp", "none"]
    num_draft_tokens: Optional[int] = Field(None, ge=1, le=32)


class SamplingExtras(Strict):
    """The sampling fields beyond OpenAI's core set, the same on every endpoint that takes them (the chat and
    completions bodies, and the Responses API's, as vLLM accepts them there)."""

    top_k: Optional[TopK] = None
    min_p: Optional[MinP] = None
    repetition_penalty: Optional[RepetitionPenalty] = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    seed: Optional[Seed] = None
    stop: Union[str, list[str], None] = None


class Sampling(SamplingExtras):
    """Fields shared by both endpoints."""

    model: Optional[str] = None
    max_tokens: Optional[TokenCount] = None
    temperature: Optional[Temperature] = None
    top_p: Optional[TopP] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(1, ge=1, le=128)  # anything but 1 is refused (one completion per request)
    user: Optional[str] = None  # an end-user id for the caller's logs; changes nothing
    speculative: Optional[SpeculativeOptions] = None  # None: the server's default (serve --prompt-lookup, ...)

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[TokenCount] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    tools: Optional[list[Tool]] = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    response_format: Optional[ResponseFormat] = None
    # vLLM's extension: extra chat template variables, e.g. {"enable_thinking": false} for Qwen3.
    chat_template_kwargs: Optional[dict[str, Any]] = None
    # vLLM's extension: false drops a thinking model's reasoning from the reply instead of returning it apart.
    include_reasoning: bool = True


class CompletionRequest(Sampling):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    echo: Literal[False] = False
