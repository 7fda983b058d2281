"""A softmax classifier in numpy: weights in the model archive, trained by make_model.py."""
