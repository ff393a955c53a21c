"""POST /v1/feedback: an outcome for a response's feedback id, kept and counted."""

from fastapi import APIRouter, Request

from steering.errors import InvalidRequest
from steering_server.deps import AnyState
from steering_server.feedback.protocol import FeedbackRequest, FeedbackResponse
from steering_server.openapi import ERRORS
from steering_server.protocol import ErrorResponse

router = APIRouter()


@router.post("/v1/feedback", response_model=FeedbackResponse,
             responses={**ERRORS, 409: {"model": ErrorResponse, "description": "Another outcome was kept for this id."}})
async def create_feedback(request: Request, body: FeedbackRequest, server: AnyState) -> FeedbackResponse:
    """Each response takes one outcome: the same one sent again is answered as already recorded, a
    different one is refused (409). A forged, expired or malformed id is refused (400)."""
    if server.feedback is None:
        raise InvalidRequest("this deployment takes no feedback: its config has no feedback section", param=None)
    return await server.feedback.record(body)
