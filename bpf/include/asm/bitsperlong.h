/* The BPF target has no asm/ of its own; these map the UAPI headers to
 * their generic forms so the build does not depend on the host arch. */
#pragma once
#define __BITS_PER_LONG 64
#include <asm-generic/bitsperlong.h>
