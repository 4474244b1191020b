// tresor/train/trainer.h — training the U-Net on preprocessed CT (issue 9, docs/training.md §6):
// patches drawn from `tresor prep`'s outputs (foreground-biased crops and augmentation,
// tresor/ct/augment.h), two input channels (the z-scored image and the vesselness), a binary
// target (the foreground label against everything else), nnU-Net's loss, an optimizer step per
// batch, and validation Dice on fixed patches of held-out cases. CPU reference.
#pragma once

#include <functional>
#include <memory>
#include <vector>

#include "tresor/ct/augment.h"
#include "tresor/ct/prep.h"
#include "tresor/encoding.h"
#include "tresor/train/collective.h"
#include "tresor/train/unet.h"

namespace tresor::train {

struct TrainerOptions {
  UNetConfig model{3, 4, 32, 2, 2};       // two input channels, two classes
  size_t patch = 24;                      // voxels per side (a multiple of 2^(levels−1))
  size_t batch = 2;
  size_t steps = 200;                     // the run's length (the schedule spans it)
  size_t stop_after = 0;                  // stop once this many steps are done (0: at `steps`)
  bool adamw = true;                      // false: SGD with Nesterov momentum (nnU-Net's)
  double lr = 1e-2, weight_decay = 1e-4;  // the poly schedule decays lr to 0 over `steps`
  double vesselness_scale = 5;            // the second channel: vesselness × this
  uint8_t foreground_label = ct::kCoronary;
  double foreground_fraction = 2.0 / 3;
  /// The training patches' augmentation (nnU-Net's defaults, tresor/ct/augment.h); its patch,
  /// foreground label and foreground fraction are the fields above (sampler_options).
  ct::AugmentOptions augment;
  size_t validation_patches = 8;
  size_t validate_every = 50;
  uint64_t seed = 1;
  unsigned threads = 0;
  /// Data parallelism (docs/training.md §5): with a collective of R ranks, every rank runs this
  /// with the same options; rank r trains on its share of each global batch of `batch` patches
  /// (the same patches one rank would draw), the loss's statistics and the gradients are summed
  /// over the ranks (the gradients bucket by bucket while the backward pass runs), and every rank
  /// takes the same optimizer step: the weights match a single-rank run's up to the order of
  /// floating-point additions. Validation patches are split over the ranks and their Dice counts
  /// summed. Rank 0's parameters are broadcast first.
  Collective* collective = nullptr;
  size_t bucket_elements = size_t{25} << 18;  // 25 MiB of float gradients, PyTorch DDP's default bucket
};

/// The patch sampler's options for training (`augment`) or for validation (centred on
/// foreground, no augmentation); train::PatchSource and the GPU data loader both use these.
[[nodiscard]] ct::AugmentOptions sampler_options(const TrainerOptions& o, bool augment);

struct TrainingLog {
  std::vector<double> loss;                          // per step
  std::vector<std::pair<size_t, double>> val_dice;  // (steps done, Dice); the first entry is before training
};

/// Where a run stands: the steps done and the optimizers' state. A run resumed from a state
/// continues exactly as if it had not stopped (patch draws and the schedule follow the step).
struct TrainState {
  uint64_t step = 0;
  Sgd sgd;
  AdamW adam;
};

/// A checkpoint: the model's configuration and parameters, and the state (docs/training.md §7).
/// `patch`: the training patch size, which inference uses as its tile (0: not recorded).
[[nodiscard]] Bytes checkpoint_bytes(const UNet& net, const TrainState& state, bool adamw, size_t patch = 0);
struct Checkpoint {
  UNetConfig config;
  size_t patch = 0;  // 0 in version 1 files
  std::vector<float> parameters;
  TrainState state;
  bool adamw = true;
};
/// kMalformed names the field: magic, version, sizes, trailing bytes.
[[nodiscard]] Result<Checkpoint> parse_checkpoint(ByteSpan bytes);

/// Progress: steps done, the last loss, the last validation Dice (or −1).
using TrainProgress = std::function<void(size_t, double, double)>;

/// Trains `net` (whose config must have 2 input channels and 2 classes) on `train` and validates on
/// `validation` (each a prepared case with labels). kInvalidArgument names what is wrong: no
/// cases, a case without labels, a patch that does not fit a case or is not a multiple of
/// 2^(levels−1), a model of other channels or classes.
/// With `state`, training continues from state->step (to options.steps) and leaves the state there.
[[nodiscard]] Result<TrainingLog> train_unet(UNet& net, const std::vector<const ct::Prepared*>& train, const std::vector<const ct::Prepared*>& validation,
                                             const TrainerOptions& options, const TrainProgress& progress = {}, TrainState* state = nullptr);

/// The training patches train_unet draws (foreground-biased crops and augmentation of the cases,
/// seeded by the step): any trainer that uses it sees exactly the CPU trainer's data. kInvalidArgument
/// names a case without labels or a patch that does not fit.
class PatchSource {
 public:
  [[nodiscard]] static Result<PatchSource> create(const std::vector<const ct::Prepared*>& cases, const TrainerOptions& options);
  /// Slots [lo, hi) of training step `step`'s global batch of options.batch patches into x
  /// [hi − lo, 2, P, P, P] and the binary targets y [(hi − lo)·P³].
  void fill_step(size_t step, size_t lo, size_t hi, Tensor& x, std::vector<uint8_t>& y) const;

 private:
  struct Impl;
  std::shared_ptr<const Impl> impl_;
};

/// The end of training step `step` (0-based) that every trainer shares: the state's step count,
/// the loss in the log, validation every options.validate_every steps and at `end`, the progress
/// callback (with the validation Dice, or −1 when none was taken).
[[nodiscard]] Result<void> record_step(size_t step, size_t end, double loss, const TrainerOptions& options, TrainState& state, TrainingLog& log,
                                       const std::function<Result<double>()>& validate, const TrainProgress& progress);

/// The validation batch train_unet uses: options.validation_patches patches centred on the
/// foreground, round-robin over the cases, no augmentation; inputs [n, 2, P, P, P] and binary
/// targets.
[[nodiscard]] Result<std::pair<Tensor, std::vector<uint8_t>>> validation_batch(const std::vector<const ct::Prepared*>& cases, const TrainerOptions& options);

/// Deep supervision (nnU-Net, docs/training.md §4): the weights of `outputs` outputs — 1/2^j for
/// output j, the last (lowest resolution) 0, normalised to sum 1; {1} for one output.
[[nodiscard]] std::vector<double> deep_supervision_weights(size_t outputs);
/// Targets [n, d, h, w] (x fastest) at 1/2^j resolution, nearest-exact as PyTorch's
/// interpolate(mode="nearest-exact"): output voxel i takes source ⌊(i + ½)·2^j⌋ on each axis
/// (d, h, w must be multiples of 2^j).
[[nodiscard]] std::vector<uint8_t> downsample_target(const std::vector<uint8_t>& target, std::array<size_t, 4> ndhw, size_t j);
/// The loss over every output of UNet::forward_outputs: Σ_j w_j · dice_ce_loss(output j, target at
/// 1/2^j) with deep_supervision_weights; outputs of weight 0 get zero gradients. `loss` is the
/// weighted sum; cross_entropy and dice are the full-resolution output's.
struct MultiLoss {
  double loss = 0, cross_entropy = 0, dice = 0;
  std::vector<Tensor> dlogits;
};
[[nodiscard]] Result<MultiLoss> deep_supervision_loss(const std::vector<Tensor>& outputs, const std::vector<uint8_t>& target, unsigned threads = 0,
                                                      const LossAllReduce& across = {});

/// The Dice of class 1 (argmax of the logits) against binary targets [n·d·h·w]: 2·|P∩G| / (|P| + |G|),
/// 1 when both are empty. dice_counts gives |P∩G|, |P|, |G| (what ranks sum before dividing).
[[nodiscard]] double dice_of_prediction(const Tensor& logits, const std::vector<uint8_t>& target);
[[nodiscard]] std::array<double, 3> dice_counts(const Tensor& logits, const std::vector<uint8_t>& target);
[[nodiscard]] double dice_from_counts(const std::array<double, 3>& counts);

}  // namespace tresor::train
