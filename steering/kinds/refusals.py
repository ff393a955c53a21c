"""What the scored kinds (abstention, decision) cannot serve, by the request field that asks for
it: admission refuses the first one a request asks for, naming that field."""

ONE_ANSWER = "abstention and decision policies answer one prompt with one choice"
NO_TOOLS = "abstention and decision policies answer in text or with a label: tools do not apply"
SCORES_ITS_ANSWER = ("abstention and decision policies score their answer, not the prompt: {field} is served by "
                     "plain policies")

SCORED = {"n": ONE_ANSWER, "prompt": ONE_ANSWER, "tools": NO_TOOLS, "echo": SCORES_ITS_ANSWER,
          "prompt_logprobs": SCORES_ITS_ANSWER}
