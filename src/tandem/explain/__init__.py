"""Why the network answered as it did: per-prediction attributions, their faithfulness, and rules.

Torch-free (the runtime and the server use them): occlusion, render, faithfulness, rules (applying stored rules).
Training side: attribute (Captum's Integrated Gradients and Grad-CAM on the bundle's weights rebuilt in torch),
and fitting rules (scikit-learn).
"""
