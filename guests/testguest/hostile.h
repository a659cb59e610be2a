/* mode=hostile: a guest that misbehaves on purpose (tests/tests/hostile.rs, docs/testguest.md). */
#ifndef TESTGUEST_HOSTILE_H
#define TESTGUEST_HOSTILE_H

#include <stdint.h>

#include "cmdline.h"

/* Carries out `attack` on vCPU 0 of a partition of `vcpus` vCPUs with `memory_size` bytes.
 * Returns when the attack is one a contained guest survives (it then keeps computing);
 * attacks that can only end in a fault or a stopped vCPU do not return. */
void hostile_attack(enum testguest_attack attack, uint64_t vcpus, uint64_t memory_size);

#endif
