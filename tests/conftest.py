"""What several test files build alike."""
import torch

import data
import smolora


def make_micro(root, tasks, n_train, n_test):
    """An untrained tiny LLaVA checkpoint in root/model and the synthetic tasks in root/data."""
    torch.manual_seed(0)
    processor = data.build_processor()
    smolora.save_checkpoint(smolora.build_tiny_model(processor), processor, root / "model")
    data.make_synthetic(root / "data", tasks, n_train=n_train, n_test=n_test, seed=0,
                        progress=False)
    return root
