// Named-barrier ids, one enum per kernel family. cutlass::arch::NamedBarrier adds its reserved
// count to these, so they never collide with CUTLASS's own barriers.
#pragma once

namespace msa::common {

enum class SelectBarrier : int {
  ListsWritten = 0,  // every consumer thread has spilled its running top-k to shared memory
  SlotsWritten = 1,  // the output rows in shared memory are complete
};

}  // namespace msa::common
