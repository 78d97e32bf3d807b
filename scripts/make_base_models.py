"""Train the book's small base models once and store them as safetensors files.

Run from the repository root: `python scripts/make_base_models.py [mlp] [llama]`. The result is
deterministic on the same torch build and thread count (2 threads, CPU).
"""

import torch
from safetensors.torch import save_file

from lora_edu.experiments import MLP, pretraining_task, seed_everything, train
from lora_edu.experiments.llama import TinyLlama
from lora_edu.experiments.pretrained import DATA_DIR, LLAMA_BASE, MLP_BASE, llama_pretraining_task


def make_mlp_base() -> None:
    torch.set_num_threads(2)
    seed_everything(0)
    model = MLP(**MLP_BASE["dims"])
    losses = train(
        model,
        pretraining_task(),
        steps=MLP_BASE["steps"],
        lr=MLP_BASE["lr"],
        batch_size=MLP_BASE["batch_size"],
        data_seed=0,
        desc="pretrain MLP",
    )
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    save_file(state, str(DATA_DIR / MLP_BASE["file"]), metadata={"final_loss": f"{losses[-1]:.3g}"})
    print(f"MLP base: loss {losses[0]:.3g} -> {losses[-1]:.3g}")


def make_llama_base() -> None:
    torch.set_num_threads(2)
    seed_everything(0)
    model = TinyLlama(LLAMA_BASE["config"])
    losses = train(
        model,
        llama_pretraining_task(),
        steps=LLAMA_BASE["steps"],
        lr=LLAMA_BASE["lr"],
        batch_size=LLAMA_BASE["batch_size"],
        data_seed=0,
        desc="pretrain tiny LLaMA",
    )
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(
        state, str(DATA_DIR / LLAMA_BASE["file"]), metadata={"final_loss": f"{losses[-1]:.3g}"}
    )
    print(f"tiny LLaMA base: loss {losses[0]:.3g} -> {losses[-1]:.3g}")


if __name__ == "__main__":
    import sys

    which = sys.argv[1:] or ["mlp", "llama"]
    if "mlp" in which:
        make_mlp_base()
    if "llama" in which:
        make_llama_base()
