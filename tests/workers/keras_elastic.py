"""Run under elastic horovodrun on two one-slot 'hosts': Horovod's own elastic Keras API on Keras 3.

hvd.elastic.KerasState with the commit / batch / epoch callbacks under hvd.elastic.run, as Horovod's elastic Keras
example trains. Rank 1 SIGKILLs itself once, mid-epoch (a marker file stops its second incarnation from doing it
again); the survivor goes back to the last commit and finishes alone. Prints one line per worker that finishes.
"""

import os
import signal
import sys

import horovod.tensorflow.keras as hvd
import keras
import numpy as np

EPOCHS, BATCHES, KILL_AT = 4, 10, (2, 6)  # kill rank 1 at epoch 2, batch 6
marker = sys.argv[1]
hvd.init()
rng = np.random.default_rng(0)
x = rng.normal(size=(BATCHES * 8, 5)).astype("float32")
y = x @ rng.normal(size=(5, 1)).astype("float32")

keras.utils.set_random_seed(hvd.rank())  # different weights: the first sync must hand out rank 0's
model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)])
model.compile(optimizer=hvd.DistributedOptimizer(keras.optimizers.SGD(0.05, momentum=0.9)), loss="mse")
state = hvd.elastic.KerasState(model, batch=0, epoch=0)
resets = []
state.register_reset_callbacks([lambda: resets.append(hvd.size())])


class KillRank1Once(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if hvd.rank() == 1 and (state.epoch, batch) == KILL_AT and not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)


callbacks = [hvd.elastic.CommitStateCallback(state, batches_per_commit=3), hvd.elastic.UpdateBatchStateCallback(state),
             hvd.elastic.UpdateEpochStateCallback(state), KillRank1Once()]


@hvd.elastic.run
def train(state):
    model.fit(x, y, batch_size=8, epochs=EPOCHS - state.epoch, shuffle=False, verbose=0, callbacks=callbacks)
    return model.evaluate(x, y, verbose=0)


loss = train(state)
print(f"finished rank {hvd.rank()} of {hvd.size()}: epoch {state.epoch} batch {state.batch} resets {resets} "
      f"loss {loss:.4f} first-loss {float(np.mean(y ** 2)):.4f}", flush=True)
