"""medtune: fine-tune an open LLM on medical QA, serve it behind guardrails, compare it with its base.

This is the package root. The stages live in the top-level folders of the repository and are
installed as its subpackages (see pyproject.toml):

    medtune.training    data prepare/build, default-model import, distributed fine-tuning
    medtune.serving     OpenAI-compatible Ray Serve + vLLM application
    medtune.guardrails  safety policy around every request and response
    medtune.chatbot     Gradio app, base | fine-tuned side by side
    medtune.evaluation  PubMedQA accuracy and side-by-side samples

Run `medtune --help` for the command line.
"""

__version__ = "0.1.0"
