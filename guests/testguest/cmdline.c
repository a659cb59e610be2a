/* Command-line parsing for the test guest (see cmdline.h). No libc: it runs freestanding. */
#include "cmdline.h"

static const char *const mode_names[] = {
    [MODE_BARRIER] = "barrier",
    [MODE_CPUBOUND] = "cpubound",
    [MODE_OOB] = "oob",
    [MODE_IDLE] = "idle",
    [MODE_HOSTILE] = "hostile",
    [MODE_MANAGER] = "manager",
    [MODE_WRITER] = "writer",
    [MODE_READER] = "reader",
};

static const char *const attack_names[] = {
    [ATTACK_NONE] = "none",
    [ATTACK_PORTS] = "ports",
    [ATTACK_STRING_IO] = "string-io",
    [ATTACK_MSR_APIC_BASE] = "msr-apic-base",
    [ATTACK_MSR_EFER] = "msr-efer",
    [ATTACK_MSR_PAT] = "msr-pat",
    [ATTACK_MSR_VMX] = "msr-vmx",
    [ATTACK_MSR_UNKNOWN] = "msr-unknown",
    [ATTACK_VMXON] = "vmxon",
    [ATTACK_VMREAD] = "vmread",
    [ATTACK_INVEPT] = "invept",
    [ATTACK_XSETBV] = "xsetbv",
    [ATTACK_CLI_HLT] = "cli-hlt",
    [ATTACK_CLI_SPIN] = "cli-spin",
    [ATTACK_TRIPLE_FAULT] = "triple-fault",
    [ATTACK_HYPERCALLS] = "hypercalls",
    [ATTACK_IPI_FLOOD] = "ipi-flood",
    [ATTACK_SELF_IPI] = "self-ipi",
    [ATTACK_INIT_SIPI] = "init-sipi",
    [ATTACK_IOAPIC] = "ioapic",
    [ATTACK_LAPIC_ODD] = "lapic-odd",
    [ATTACK_STRING_MMIO] = "string-mmio",
    [ATTACK_LOCKED_MMIO] = "locked-mmio",
    [ATTACK_GPA_HOLE] = "gpa-hole",
    [ATTACK_REBOOT_CF9] = "reboot-cf9",
    [ATTACK_REBOOT_KBD] = "reboot-kbd",
    [ATTACK_POWEROFF] = "poweroff",
    [ATTACK_IRQ_STORM] = "irq-storm",
};
_Static_assert(sizeof attack_names / sizeof attack_names[0] == ATTACK_COUNT, "a name per attack");

const char *testguest_mode_name(enum testguest_mode mode)
{
    return (unsigned)mode < sizeof mode_names / sizeof mode_names[0] ? mode_names[mode] : "?";
}

const char *testguest_attack_name(enum testguest_attack attack)
{
    return (unsigned)attack < ATTACK_COUNT ? attack_names[attack] : "?";
}

/* Appends s[0..n) to err at *pos, keeping room for the terminator. */
static void err_append(char *err, size_t *pos, const char *s, size_t n)
{
    for (size_t i = 0; i < n && s[i] && *pos + 1 < CMDLINE_ERROR_MAX; i++)
        err[(*pos)++] = s[i];
    err[*pos] = 0;
}

static size_t cstr_len(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

/* err = what + " '" + word + "'" (the word cut short if it does not fit). */
static int fail(char *err, const char *what, const char *word, size_t word_len)
{
    size_t pos = 0;
    err[0] = 0;
    err_append(err, &pos, what, cstr_len(what));
    err_append(err, &pos, " '", 2);
    if (word_len > 40)
        word_len = 40;
    err_append(err, &pos, word, word_len);
    err_append(err, &pos, "'", 1);
    return -1;
}

static int equals(const char *s, size_t n, const char *lit)
{
    size_t i = 0;
    for (; i < n; i++)
        if (lit[i] != s[i])
            return 0;
    return lit[i] == 0;
}

/* Decimal digits only, at least one, no overflow. */
static int parse_u64(const char *s, size_t n, uint64_t *out)
{
    uint64_t v = 0;
    if (n == 0)
        return -1;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        uint64_t d = (uint64_t)(s[i] - '0');
        if (v > (UINT64_MAX - d) / 10)
            return -1;
        v = v * 10 + d;
    }
    *out = v;
    return 0;
}

int testguest_parse_cmdline(const char *line, size_t len, struct testguest_options *out,
                            char err[CMDLINE_ERROR_MAX])
{
    struct testguest_options o = {
        .mode = MODE_BARRIER, .work = DEFAULT_WORK, .iters = DEFAULT_ITERS,
        .oob_after = DEFAULT_OOB_AFTER,
    };
    int have_mode = 0;
    size_t i = 0;

    for (size_t n = 0; n < len; n++)
        if (line[n] == 0) {
            len = n;
            break;
        }

    while (i < len) {
        while (i < len && (line[i] == ' ' || line[i] == '\t'))
            i++;
        if (i == len)
            break;
        const char *word = line + i;
        size_t word_len = 0;
        while (i < len && line[i] != ' ' && line[i] != '\t') {
            i++;
            word_len++;
        }
        size_t key_len = 0;
        while (key_len < word_len && word[key_len] != '=')
            key_len++;
        if (key_len == word_len || key_len == 0)
            return fail(err, "expected key=value, got", word, word_len);
        const char *value = word + key_len + 1;
        size_t value_len = word_len - key_len - 1;

        if (equals(word, key_len, "mode")) {
            int found = 0;
            for (unsigned m = 0; m < sizeof mode_names / sizeof mode_names[0]; m++)
                if (equals(value, value_len, mode_names[m])) {
                    o.mode = (enum testguest_mode)m;
                    found = 1;
                }
            if (!found)
                return fail(err, "unknown mode (docs/testguest.md) in", word, word_len);
            have_mode = 1;
        } else if (equals(word, key_len, "attack")) {
            int found = 0;
            for (unsigned a = ATTACK_NONE + 1; a < ATTACK_COUNT; a++)
                if (equals(value, value_len, attack_names[a])) {
                    o.attack = (enum testguest_attack)a;
                    found = 1;
                }
            if (!found)
                return fail(err, "unknown attack (docs/testguest.md) in", word, word_len);
        } else {
            uint64_t *target;
            if (equals(word, key_len, "work"))
                target = &o.work;
            else if (equals(word, key_len, "iters"))
                target = &o.iters;
            else if (equals(word, key_len, "oob_after"))
                target = &o.oob_after;
            else if (equals(word, key_len, "shared"))
                target = &o.shared;
            else if (equals(word, key_len, "revoke_after"))
                target = &o.revoke_after;
            else
                return fail(err, "unknown option (mode, work, iters, oob_after, attack, shared, revoke_after)", word,
                            word_len);
            if (parse_u64(value, value_len, target) != 0)
                return fail(err, "malformed number (decimal expected) in", word, word_len);
        }
    }
    if (!have_mode)
        return fail(err, "missing mode=barrier|cpubound|oob|idle|hostile|manager|writer|reader in", line, len);
    if ((o.mode == MODE_HOSTILE) != (o.attack != ATTACK_NONE))
        return fail(err, "attack= goes with mode=hostile, and mode=hostile needs one:", line, len);
    *out = o;
    err[0] = 0;
    return 0;
}
