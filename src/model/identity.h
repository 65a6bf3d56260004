// Which model a KV profile was made for: the checkpoint folder's name, the layer count and a
// fingerprint of the tensor index (names, dtypes, shapes), so that a profile is not applied to
// another model by mistake (Profile::check_compatible).
#pragma once
#include "kv/profile.h"
#include "model/model.h"

namespace pkv {

ModelIdentity model_identity(const Model& model);

}  // namespace pkv
