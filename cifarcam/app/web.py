"""The local web app of `cifarcam app`: Gradio layout and callbacks only; the work is done by
`app.explorer` and `evaluation.predict`. Gradio is the optional extra `pip install "cifarcam[app]"`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from cifarcam.app.explorer import APP_LAYERS, PREDICTED, RunExplorer
from cifarcam.errors import CifarcamError
from cifarcam.evaluation.images import TRANSFORM, ImageInput, enlarge, read_image
from cifarcam.explain.methods import METHODS

NOTHING: tuple[Any, ...] = (None, None, "", None, None)


def build(explorer: RunExplorer) -> gr.Blocks:
    """The app over `explorer`: its layout, then its callbacks."""
    predictor = explorer.predictor
    info = predictor.info
    with gr.Blocks(title=f"cifarcam: {explorer.run.name}", analytics_enabled=False) as demo:
        gr.Markdown(
            f"## cifarcam: run `{explorer.run.name}`\n"
            f"{info.model} width {info.width}, {predictor.checkpoint} checkpoint (epoch {info.epoch}), "
            f"test accuracy {explorer.accuracy:.2%}. Each image is read like `cifarcam predict` reads it: "
            f"{TRANSFORM}."
        )
        current = gr.State(None)  # the ImageInput on show
        with gr.Row():
            with gr.Column():
                upload = gr.Image(
                    label="Your image",
                    type="filepath",
                    image_mode=None,  # the file as uploaded: decoded as `cifarcam predict` decodes it
                    sources=["upload"],
                    height=280,
                    elem_id="upload",
                )
                with gr.Row():
                    test_index = gr.Number(
                        label=f"or test image # (0-{len(explorer.test_images) - 1})",
                        value=0,
                        precision=0,
                        elem_id="test-index",
                    )
                    pick = gr.Button("Show test image", elem_id="pick-test")
                transform = gr.Markdown(elem_id="transform")
                model_input = gr.Image(
                    label="What the model sees (32x32, enlarged)",
                    interactive=False,
                    format="png",
                    height=280,
                    elem_id="model-input",
                )
            with gr.Column():
                topk = gr.Label(label="Top 3", num_top_classes=3, elem_id="topk")
                cam = gr.Image(label="CAM", interactive=False, format="png", height=280, elem_id="cam")
                controls: list[Any] = [  # layer, method, target class, opacity
                    gr.Radio(list(APP_LAYERS), value="layer4", label="Layer", elem_id="layer"),
                    gr.Dropdown(list(METHODS), value="gradcam", label="Method", elem_id="method"),
                    gr.Dropdown(
                        [PREDICTED, *predictor.classes],
                        value=PREDICTED,
                        label="Target class",
                        elem_id="target",
                    ),
                    gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Opacity", elem_id="opacity"),
                ]
        with gr.Tab(f"The {len(explorer.mistakes)} most confident mistakes (click one to explain it)"):
            gallery = gr.Gallery(
                value=explorer.gallery(),
                columns=8,
                format="png",
                allow_preview=False,
                show_label=False,
                elem_id="mistakes",
            )
        with gr.Tab("Curves"):
            gr.Image(
                value=explorer.curves(), show_label=False, interactive=False, format="png", elem_id="curves"
            )

        shown = [current, model_input, transform, topk, cam]
        act = Actions(explorer)
        upload.upload(act.on_upload, [upload, *controls], shown)
        upload.clear(lambda: NOTHING, None, shown)
        pick.click(act.on_test_image, [test_index, *controls], shown)
        gallery.select(act.on_mistake, controls, shown)
        for control in controls:  # a dragged slider changes many times: explain the last value only
            control.change(act.explain, [current, *controls], [topk, cam], trigger_mode="always_last")
    return demo


class Actions:
    """An uploaded or picked image shown as the model sees it, with its top classes and CAM."""

    def __init__(self, explorer: RunExplorer) -> None:
        self.explorer = explorer

    def explain(
        self, image: ImageInput | None, layer: str, method: str, target: str, alpha: float
    ) -> tuple[Any, Any]:
        if image is None:
            return None, None
        try:
            explanation = self.explorer.explain(image, layer, method, target, alpha)
        except CifarcamError as error:
            raise gr.Error(error.message) from None
        label = f"{method} at {layer} for '{explanation.target}' (red = high)"
        return dict(explanation.top), gr.Image(value=explanation.overlay, label=label)

    def show(self, image: ImageInput, about: str, *settings: Any) -> tuple[Any, ...]:
        return (image, enlarge(image.pixels), about, *self.explain(image, *settings))

    def on_upload(self, path: str | None, *settings: Any) -> tuple[Any, ...]:
        if path is None:
            return NOTHING
        try:
            image = read_image(Path(path))
        except CifarcamError as error:
            raise gr.Error(error.message) from None
        return self.show(image, f"Upload: {image.describe()}", *settings)

    def on_test_image(self, index: float | None, *settings: Any) -> tuple[Any, ...]:
        number = int(index or 0)
        try:
            image = self.explorer.test_image(number)
        except CifarcamError as error:
            raise gr.Error(error.message) from None
        return self.show(
            image, f"Test image #{number}, true class: {self.explorer.test_label(number)}", *settings
        )

    def on_mistake(self, selected: gr.SelectData, *settings: Any) -> tuple[Any, ...]:
        mistake = self.explorer.mistakes[int(selected.index)]
        return self.show(
            self.explorer.test_image(mistake.index), f"Test image {mistake.caption()}", *settings
        )


def launch(demo: gr.Blocks, host: str, port: int) -> str:
    """Serve in a background thread on host:port only: no share link, analytics, run history or
    server-side rendering. Returns the local URL; `demo.close()` stops it."""
    _, url, _ = demo.launch(
        server_name=host,
        server_port=port,
        share=False,
        inbrowser=False,
        prevent_thread_lock=True,
        quiet=True,
        ssr_mode=False,
        pwa=False,
        mcp_server=False,
        run_history=False,
        enable_monitoring=False,
        footer_links=[],
        theme=gr.themes.Default(),  # its fonts are files inside the gradio package, served locally
    )
    return str(url)
