"""POST /v1/feedback: the outcome of a decision or abstention, for its feedback id."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from steering_server.protocol import StrictRequest, Text


class FeedbackRequest(StrictRequest):
    id: Annotated[Text, Field(min_length=1, max_length=16384)] = Field(
        description="The response's steering.feedback_id.")
    outcome: Annotated[Text, Field(min_length=1, max_length=1024)] = Field(
        description="An abstention: correct or incorrect (was the answer, given or withheld, right). A decision: "
        "its true label.")


class FeedbackResponse(BaseModel):
    object: Literal["feedback"] = "feedback"
    status: Literal["recorded", "already recorded"] = Field(
        description="already recorded: the same outcome was sent for this id before (sending it again is safe).")
    policy: str
    digest: str = Field(description="The config the response was made under.")
