/* hotplug.h — the thread that follows tokens being inserted and removed. */
#ifndef SMIME_HOTPLUG_H
#define SMIME_HOTPLUG_H

struct agent;

int hotplug_start(struct agent *a);

#endif
