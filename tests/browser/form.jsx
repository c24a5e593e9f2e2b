/* The "Plugin Config" tab of Transformer Lab's training-template dialog, rebuilt as the plugin-era app built
 * it from a plugin's index.json (transformerlab-app's Experiment/DynamicPluginForm.tsx and the submit handler
 * of Train/TrainingModalLoRA.tsx, last versions before plugins were removed; rjsf 5.24.3, Joy 5.0.0-beta.48).
 * Same schema construction, Form props, templates and widgets, so what a user sees and what the app saves
 * are what this page shows and returns. The app's quirks are kept on purpose (a select that never reports
 * its change to rjsf, string values from the DOM overwritten by rjsf's typed formData): the test is about
 * what the plugin receives from the real thing.
 *
 * Exposes to the driver: window.formCheck (ajv's meta-schema verdicts, once rendered) and
 * window.submittedConfig (the `config` the app would save, after "Save Training Template").
 */
import * as React from 'react';
import { createRoot } from 'react-dom/client';
import Form from '@rjsf/core';
import validator from '@rjsf/validator-ajv8';
import { ariaDescribedByIds, getInputProps, rangeSpec } from '@rjsf/utils';
import { CssVarsProvider } from '@mui/joy/styles';
import CssBaseline from '@mui/joy/CssBaseline';
import { Button, FormControl, FormLabel, Input, Slider, Stack } from '@mui/joy';

/** The app's getSchema: `parameters` as the properties, untouched (per-property `required: true` included),
 * and a top-level `required` list gathered from those flags. */
function appSchema(manifest) {
  const properties = manifest.parameters;
  const required = Object.keys(properties).filter((key) => properties[key]?.required);
  return { schema: { type: 'object', required, properties }, uiSchema: manifest.parameters_ui };
}

/** The same schema without the per-property booleans, which draft-07 does not allow (`required` must be an
 * array): the form a strict JSON-schema consumer needs. */
function strictSchema(schema) {
  const properties = Object.fromEntries(
    Object.entries(schema.properties).map(([key, { required, ...property }]) => [key, property]),
  );
  return { ...schema, properties };
}

/** Text and number inputs: a Joy Input carrying rjsf's input props (type, step, min, max). */
function BaseInputTemplate(props) {
  const {
    schema, id, options, label, value, type, placeholder, required, disabled, readonly, autofocus,
    onChange, onChangeOverride, onBlur, onFocus, rawErrors, hideError, uiSchema, registry, formContext,
    ...rest
  } = props;
  const inputProps = { ...rest, ...getInputProps(schema, type, options) };
  const { step, min, max } = inputProps;
  return (
    <Input
      id={id}
      value={value}
      placeholder={placeholder}
      disabled={disabled}
      required={required}
      readOnly={readonly}
      autoFocus={autofocus}
      error={rawErrors?.length > 0 && !hideError}
      onChange={onChangeOverride || (({ target }) => onChange(target.value === '' ? options.emptyValue || '' : target.value))}
      onBlur={({ target }) => onBlur(id, target.value)}
      onFocus={({ target }) => onFocus(id, target.value)}
      {...inputProps}
      slotProps={{ input: { step, min, max } }}
    />
  );
}

/** "ui:widget": "RangeWidget": a Joy Slider whose step comes from rangeSpec, i.e. the schema's multipleOf
 * (Joy's default step of 1 without it). */
function RangeWidget({ value, readonly, disabled, onBlur, onFocus, options, schema, onChange, required, label, id }) {
  return (
    <>
      &nbsp;({value})
      <Stack direction="row">
        <Slider
          disabled={disabled || readonly}
          required={required}
          onChange={(_, newValue) => onChange(newValue ?? options.emptyValue)}
          onBlur={({ target }) => onBlur(id, target.value)}
          onFocus={({ target }) => onFocus(id, target.value)}
          valueLabelDisplay="auto"
          value={value}
          label={label}
          id={id}
          name={id}
          {...rangeSpec(schema)}
          aria-describedby={ariaDescribedByIds(id)}
        />
      </Stack>
    </>
  );
}

/** Enums: the app's plain <select>. Uncontrolled and, as in the app, without an onChange: a pick shows in the
 * DOM (and in the form's FormData) but never reaches rjsf's formData. */
function SelectWidget({ id, options, required, disabled, value }) {
  return (
    <select name={id} id={id} required={required} disabled={disabled} defaultValue={String(value ?? '')}>
      {options.enumOptions.map(({ label }) => (
        <option key={label} value={String(label)} label={label}>
          {label}
        </option>
      ))}
    </select>
  );
}

/** Label (with * when required), the widget, then ui:help in <small>. */
function FieldTemplate({ id, classNames, style, label, help, required, description, errors, children }) {
  return (
    <div className={classNames} style={style}>
      <FormControl>
        <FormLabel htmlFor={id}>
          {label}
          {required ? '*' : null}
        </FormLabel>
        {description}
        {children}
        <small>{help}</small>
        {errors}
      </FormControl>
    </div>
  );
}

/** DynamicPluginForm for a new template: rjsf's formData mirrored to window.currentFormData on every change
 * and to hidden inputs for the enclosing form. */
function PluginForm({ schema, uiSchema }) {
  const [formData, setFormData] = React.useState({});
  const onChange = ({ formData: changed }) => {
    setFormData(changed);
    window.currentFormData = changed;
  };
  return (
    <>
      <Form
        tagName="div"
        className="pure-form pure-form-stacked dynamic-plugin-form"
        schema={schema}
        uiSchema={uiSchema}
        formData={formData}
        onChange={onChange}
        validator={validator}
        idPrefix=""
        idSeparator=""
        id="plugin_parameters"
        templates={{ FieldTemplate, BaseInputTemplate }}
        widgets={{ RangeWidget, SelectWidget }}
        noHtml5Validate
        showErrorList={false}
      >
        <div style={{ display: 'none' }} />
      </Form>
      {Object.entries(formData).map(([key, value]) => (
        <input key={key} type="hidden" name={key} value={Array.isArray(value) ? value.join(',') : value ?? ''} readOnly />
      ))}
    </>
  );
}

/** The dialog's <form>: on submit the app saves the DOM's FormData (all strings) overwritten by rjsf's formData. */
function TrainingTemplateForm({ schema, uiSchema }) {
  const onSubmit = (event) => {
    event.preventDefault();
    const config = Object.fromEntries(new FormData(event.currentTarget).entries());
    if (window.currentFormData) Object.assign(config, window.currentFormData);
    window.submittedConfig = config;
  };
  return (
    <form id="training-form" onSubmit={onSubmit}>
      <PluginForm schema={schema} uiSchema={uiSchema} />
      <Button type="submit" variant="soft" color="success">
        Save Training Template
      </Button>
    </form>
  );
}

/** ajv's own meta-schema check, by the validator instance the form uses. */
function metaCheck(schema) {
  const valid = validator.ajv.validateSchema(schema);
  return { valid, errors: valid ? [] : validator.ajv.errors.map((e) => `${e.instancePath} ${e.message}`) };
}

const manifest = JSON.parse(await (await fetch('index.json')).text()); // the app fetched the file as text
const { schema, uiSchema } = appSchema(manifest);
createRoot(document.getElementById('app')).render(
  <CssVarsProvider>
    <CssBaseline />
    <TrainingTemplateForm schema={schema} uiSchema={uiSchema} />
  </CssVarsProvider>,
);
window.formCheck = {
  strictSchema: metaCheck(strictSchema(schema)),
  appSchema: metaCheck(schema),
  validateFormData: (formData) => validator.validateFormData(formData, strictSchema(schema)).errors.map((e) => e.stack),
};
